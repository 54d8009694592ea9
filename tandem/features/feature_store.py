"""The Feast repo as callable steps: render, apply, materialize, push, training reads.

Steps (the DAGs and ``make demo`` call these; each is idempotent):

- :func:`render` places ``feature_repo/{feature_store.yaml,definitions.py}`` in the state's
  ``feast/`` folder (``Paths.feast``), so tests and the demo never write into the source repo.
  The profile is the embedded default (SQLite online store) or ``redis``
  (``TANDEM_FEAST_ONLINE=redis``, connection in ``TANDEM_FEAST_REDIS``; a password in it stays
  in the environment: Feast expands the variable when it loads the yaml).
- :func:`apply` registers the objects of ``definitions.py``.
- :func:`materialize` loads the rows with ``event_timestamp`` in ``[start, end]`` into the online
  store (incremental: a DAG run passes its own data interval; earlier rows stay online).

Serving never calls Feast per candidate: its fast online path (the item table, the user read
under a deadline) is :mod:`tandem.features.online`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import uuid
import weakref
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tandem import schema as s
from tandem.config import REPO_ROOT, Paths
from tandem.features import entity as F

FEATURE_REPO = REPO_ROOT / "feature_repo"
PROFILES = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}
REDIS_PLACEHOLDER = "${TANDEM_FEAST_REDIS}"
USER_REFS = tuple(
    [f"{s.USER_PROFILE_VIEW}:{n}" for n, _ in s.USER_PROFILE_FIELDS]
    + [f"{s.USER_ACTIVITY_VIEW}:{n}" for n, _ in s.USER_ACTIVITY_FIELDS]
    + [f"{s.SESSION_FEATURE_VIEW}:{n}" for n, _ in s.SESSION_FIELDS])
ITEM_REFS = tuple(
    [f"{s.ITEM_CONTENT_VIEW}:{n}" for n, _ in s.ITEM_CONTENT_FIELDS]
    + [f"{s.ITEM_POPULARITY_VIEW}:{n}" for n, _ in s.ITEM_POPULARITY_FIELDS])
ITEM_VIEWS = (s.ITEM_CONTENT_VIEW, s.ITEM_POPULARITY_VIEW)
_ARROW = {"int64": pa.int64(), "float32": pa.float32(), "string": pa.string(),
          "string_list": pa.list_(pa.string()), "float32_list": pa.list_(pa.float32())}
_ROW = "_tandem_row"


def session_source_path(paths: Paths) -> Path:
    """The parquet folder behind the session push source (the training copy of pushed rows).

    The folder must match ``feature_repo/definitions.py`` (``lake/features/session/*.parquet``).
    """
    return paths.lake / "features" / "session"


def session_arrow_schema() -> pa.Schema:
    """Column order of the session batch source (offline pushes must match it exactly)."""
    return pa.schema([(s.USER_ID, pa.string()), (s.EVENT_TIMESTAMP, pa.timestamp("us", "UTC"))]
                     + [(n, _ARROW[t]) for n, t in s.SESSION_FIELDS])


def render(paths: Paths, profile: str | None = None, redis: str | None = None) -> Path:
    """Write the Feast repo into ``paths.feast`` and return that folder.

    Parameters
    ----------
    profile : "sqlite" (default, or ``TANDEM_FEAST_ONLINE``) or "redis".
    redis : "host:port[,ssl=true]" for the redis profile; None leaves ``${TANDEM_FEAST_REDIS}``
        for Feast to expand from the environment each time it loads the yaml. A connection with
        a ``password=`` is refused here: the password must stay in the environment, never in
        the rendered file.
    """
    profile = profile or os.environ.get("TANDEM_FEAST_ONLINE", "sqlite")
    if redis is not None and any(part.strip().lower().startswith("password=")
                                 for part in redis.split(",")):
        raise ValueError("a Redis password is not written into feature_store.yaml: put the "
                         "connection string in TANDEM_FEAST_REDIS and render without redis=")
    repo = paths.feast
    repo.mkdir(parents=True, exist_ok=True)
    text = (FEATURE_REPO / PROFILES[profile]).read_text()
    if redis is not None:
        text = text.replace(REDIS_PLACEHOLDER, redis)
    (repo / "feature_store.yaml").write_text(text)
    for name in ("definitions.py", ".feastignore"):
        shutil.copyfile(FEATURE_REPO / name, repo / name)
    return repo


def open_store(paths: Paths):
    """A FeatureStore over the rendered repo in ``paths.feast`` (render/apply first)."""
    from feast import FeatureStore

    return FeatureStore(repo_path=str(paths.feast))


def _definitions(paths: Paths) -> list:
    """The Feast objects of ``feature_repo/definitions.py`` with sources in ``paths.lake``.

    The file is loaded by path (not imported) with ``TANDEM_HOME`` set to ``paths.root`` for the
    duration, which is how it finds its lake; the variable is restored afterwards.
    """
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    spec = importlib.util.spec_from_file_location("tandem_feast_definitions",
                                                  FEATURE_REPO / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    before = os.environ.get("TANDEM_HOME")
    os.environ["TANDEM_HOME"] = str(paths.root.resolve())
    try:
        spec.loader.exec_module(module)
    finally:
        if before is None:
            os.environ.pop("TANDEM_HOME")
        else:
            os.environ["TANDEM_HOME"] = before
    kinds = (Entity, DataSource, FeatureView, FeatureService)
    return [v for v in vars(module).values() if isinstance(v, kinds)]


def apply(paths: Paths, profile: str | None = None, redis: str | None = None):
    """Render the repo, register every object in it, and return the FeatureStore."""
    render(paths, profile, redis)
    store = open_store(paths)
    store.apply(_definitions(paths))
    return store


def materialize(paths: Paths, start: datetime, end: datetime, store=None) -> dict:
    """Load feature rows with ``start <= event_timestamp <= end`` into the online store.

    Incremental by construction: each call moves only its interval; a row outside it that is
    already online stays. Returns the interval and the views moved (for the DAG's log).
    """
    store = store or open_store(paths)
    views = [s.USER_PROFILE_VIEW, s.USER_ACTIVITY_VIEW, s.ITEM_CONTENT_VIEW,
             s.ITEM_POPULARITY_VIEW]
    store.materialize(start_date=start, end_date=end, feature_views=views)
    return {"start": start.isoformat(), "end": end.isoformat(), "views": len(views)}


def materialization_watermark(store, views: Sequence[str] = ITEM_VIEWS) -> float | None:
    """The end (epoch seconds) of the latest interval materialized into ``views``, re-read from
    the registry (another process materializes); None when none has been materialized.

    Serving's item table polls it (``serving.item_refresh``) to reload after each
    materialization.
    """
    store.refresh_registry()
    ends = [end.timestamp() for name in views
            for _, end in store.get_feature_view(name).materialization_intervals]
    return max(ends) if ends else None


def session_frame(rows: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
    """Session rows in the push source's exact column order, missing fields at defaults."""
    frame = pd.DataFrame(rows)
    for field in F.SESSION_FIELDS:
        if field.name not in frame:
            frame[field.name] = [F.default_row([field])[field.name]] * len(frame)
    frame[s.EVENT_TIMESTAMP] = pd.to_datetime(frame[s.EVENT_TIMESTAMP], utc=True)
    return frame[[f.name for f in session_arrow_schema()]]


_PUSH_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _session_push_views(store) -> list[str]:
    """Names of the feature views whose stream source is ``SESSION_PUSH_SOURCE``."""
    views = _PUSH_VIEWS.get(store)
    if views is None:
        views = [fv.name for fv in store.list_feature_views()
                 if fv.stream_source is not None
                 and fv.stream_source.name == s.SESSION_PUSH_SOURCE]
        if not views:
            raise ValueError(f"no feature view reads push source {s.SESSION_PUSH_SOURCE}")
        _PUSH_VIEWS[store] = views
    return views


def push_session(store, rows: pd.DataFrame | Sequence[dict],
                 offline_dir: Path | None = None) -> None:
    """Push current-session rows (``user_id``, ``event_timestamp``, SESSION_* columns) online.

    With ``offline_dir`` (:func:`session_source_path`) the same rows are also written there as
    one new parquet file, so ranker training joins exactly the session values serving saw (no
    stream/training drift). Feast's own ONLINE_AND_OFFLINE mode is not used: its file store
    rewrites the whole file per push and then cannot read its own list columns back (0.67).

    The rows go straight to the online store of every view fed by the push source (resolved once
    per store). That is what ``store.push(..., PushMode.ONLINE)`` does too, but it re-reads the
    registry on every call (~30 ms, most of a 200-row push), and the stream consumer pushes
    several times a second.
    """
    frame = session_frame(rows)
    for view in _session_push_views(store):
        store.write_to_online_store(view, frame)
    if offline_dir is not None and len(frame):
        table = pa.Table.from_pandas(frame, schema=session_arrow_schema(), preserve_index=False)
        Path(offline_dir).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, Path(offline_dir) / f"part-{uuid.uuid4().hex}.parquet")


def write_shared_rows(store, views: Sequence[str], rows: pd.DataFrame, entity_ids: Sequence[str],
                      row_of: np.ndarray, batch: int = 20_000) -> int:
    """Online rows for many entities that share few distinct rows: entity ``entity_ids[i]``
    gets row ``row_of[i]`` of ``rows`` (``user_id``, ``event_timestamp`` and every field of
    each view in ``views``). Returns the entities written.

    The bulk load of the serving benchmark (5M synthetic users drawn from a few thousand
    profiles). ``write_to_online_store`` converts and deduplicates row by row (~0.5 ms per
    user and view on Redis: 5M users would take hours); here on Redis each distinct row is
    written ONCE through ``write_to_online_store`` under a placeholder entity, and its stored
    hash (Feast's own value and timestamp encoding) is copied to every entity's key (Feast's
    key encoding) in pipelined batches of ``batch``. Other online stores get the rows expanded
    ``batch`` entities at a time through ``write_to_online_store``. Memory: the distinct rows
    plus one batch.
    """
    key = s.USER_ID
    ids = np.asarray(entity_ids, dtype=object)
    row_of = np.asarray(row_of, dtype=np.int64)
    if store.config.online_store.type != "redis":
        for start in range(0, len(ids), batch):
            chunk = rows.iloc[row_of[start:start + batch]].assign(**{key: ids[start:start + batch]})
            for view in views:
                _write_view(store, view, chunk)
        return len(ids)
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    def redis_key(entity: str) -> bytes:
        return _redis_key(store.config.project,
                          EntityKey(join_keys=[key], entity_values=[Value(string_val=entity)]),
                          store.config.entity_key_serialization_version)

    placeholders = [f"__shared_row_{uuid.uuid4().hex}_{i}" for i in range(len(rows))]
    template = rows.assign(**{key: placeholders})
    for view in views:
        _write_view(store, view, template)
    client = store._get_provider().online_store._get_client(store.config.online_store)
    stored = [client.hgetall(redis_key(p)) for p in placeholders]
    client.delete(*[redis_key(p) for p in placeholders])
    # Redis's mass-insertion recipe: HSET commands in the wire protocol (RESP), each row's
    # fields packed once, sent a batch at a time (redis-py packing each command costs ~10x)
    heads = [b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * len(h)) for h in stored]
    tails = [b"".join(_resp(x) for kv in h.items() for x in kv) for h in stored]
    conn = client.connection_pool.get_connection()
    try:
        for start in range(0, len(ids), batch):
            rows_ = row_of[start:start + batch]
            conn.send_packed_command([b"".join(
                heads[r] + _resp(redis_key(e)) + tails[r]
                for e, r in zip(ids[start:start + batch], rows_, strict=True))])
            for _ in range(len(rows_)):
                conn.read_response()  # raises on an error reply
    finally:
        client.connection_pool.release(conn)
    return len(ids)


def _resp(value: bytes) -> bytes:
    """One bulk string of the Redis protocol."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _write_view(store, view: str, frame: pd.DataFrame) -> None:
    """``frame``'s key, timestamp and ``view`` columns to the online store."""
    fields = [f.name for f in store.get_feature_view(view).features]
    store.write_to_online_store(view, frame[[s.USER_ID, s.EVENT_TIMESTAMP, *fields]])


def _has_rows(view) -> bool:
    """Whether a view's parquet glob matches a file (DuckDB fails on an empty glob)."""
    pattern = Path(view.batch_source.path)
    anchor = next(i for i, part in enumerate(pattern.parts) if "*" in part)
    root = Path(*pattern.parts[:anchor])
    return any(root.glob(str(Path(*pattern.parts[anchor:]))))


def training_frame(store, entity_df: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time joined raw features for ``entity_df`` (user_id, item_id, event_timestamp).

    Every feature row joined to a label is its entity's latest with ``event_timestamp <=`` the
    label's (no view has a TTL: the online store serving reads keeps the latest row whatever its
    age, ``feature_repo/definitions.py``); an entity without one comes back missing and turns
    into the default in the matrices.
    Returns one row per ``entity_df`` row, in its order: each view of the ``ranker_v1`` service
    is joined on its own and left-joined back on a row key, so a view without rows (the session
    source before any push) or an offline store that drops unmatched rows (Feast's file/dask
    store does, 0.67) leaves that view's columns missing instead of losing the row.
    """
    keyed = entity_df.reset_index(drop=True).assign(**{_ROW: np.arange(len(entity_df))})
    out = keyed
    for projection in store.get_feature_service(s.RANKER_SERVICE).feature_view_projections:
        view = store.get_feature_view(projection.name)
        refs = [f"{view.name}:{f.name}" for f in view.features]
        if not _has_rows(view):
            continue
        joined = store.get_historical_features(entity_df=keyed, features=refs).to_df()
        values = joined.drop(columns=list(entity_df.columns)).set_index(_ROW)
        out = out.join(values, on=_ROW)
    return out.drop(columns=_ROW)


def training_matrices(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """User [n, U], item [n, I] and session [n, S] features of a :func:`training_frame`.

    Each row is featurised at its own ``event_timestamp`` (the label time).
    """
    now = F.to_epoch_ms(frame[s.EVENT_TIMESTAMP])
    return F.user_matrix(frame, now), F.item_matrix(frame, now), F.session_matrix(frame, now)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tandem.features.feature_store apply|materialize [--start ISO --end ISO] [--home
    DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["apply", "materialize"])
    parser.add_argument("--start", type=datetime.fromisoformat)
    parser.add_argument("--end", type=datetime.fromisoformat)
    parser.add_argument("--home", type=Path)
    args = parser.parse_args(argv)
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    if args.step == "apply":
        apply(paths)
        print(json.dumps({"applied": str(paths.feast)}))
    else:
        print(json.dumps(materialize(paths, args.start, args.end)))


if __name__ == "__main__":
    main()
