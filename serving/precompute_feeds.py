"""Hourly job: the top-N feed of the most active users, computed by the serving engine itself.

``python -m serving.precompute_feeds --start ISO --end ISO [--home DIR] [--share 0.01]``
(one task of ``dags/hourly.py``, after the online store is materialized). It loads the bundle
the registry alias serves (or ``--bundle-dir``), reads the latest user feature snapshot of the
interval's day (``lake/features/user``), takes the ``--share`` most active users by
``user_events_7d`` (at most ``--max-users``), answers a request for each with the same
``Engine.recommend`` a server runs (same online-store rows, same config), and stores the feeds
with their model version, config key, time and session mark (``serving.precomputed``).
Answers that fell back (store timeout, a failed part) are not stored: those users compute.

It lives under ``serving/`` because it runs the serving engine (jobs/ may not import serving).
Idempotent: a re-run overwrites each user's feed with one computed now.

Memory model: the engine (the bundle's arrays, memory-mapped) + two columns (user id, events)
of one day's user snapshot (5M users: ~0.3 GB in Arrow) + ``--batch`` feeds before each write.
Time: one engine call per user (~5-10 ms on one core): 50k heavy users take a few minutes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from serving.config import ServingConfig
from serving.engine import Engine
from serving.precomputed import Feed, config_key, open_feeds, session_mark
from serving.stores import FeastStore
from serving.validation import RecommendQuery
from tandem import schema as s
from tandem.features import feature_store
from tandem.features import online as FO
from tandem.models.bundle import DELTAS
from tandem.ops.job_cli import interval_parser, parse

log = logging.getLogger(__name__)


def active_users(folder: Path, end: datetime, share: float, max_users: int) -> list[str]:
    """The ``share`` most active users (by ``user_events_7d`` in their latest row at or before
    ``end``) of the snapshot partition of ``end``'s day under ``folder``, at most
    ``max_users``."""
    day = (end - timedelta(milliseconds=1)).date().isoformat()
    part = folder / f"{s.DATE}={day}"
    if not part.exists():
        return []
    table = ds.dataset(part, format="parquet").to_table(
        columns=[s.USER_ID, "user_events_7d", s.EVENT_TIMESTAMP],
        filter=ds.field(s.EVENT_TIMESTAMP) <= end)
    if table.num_rows == 0:
        return []
    # latest row per user: sort by time, keep the last occurrence of each id
    table = table.sort_by([(s.USER_ID, "ascending"), (s.EVENT_TIMESTAMP, "ascending")])
    ids = table.column(s.USER_ID).to_numpy(zero_copy_only=False)
    last = np.append(ids[1:] != ids[:-1], True)
    events = pc.fill_null(table.column("user_events_7d"), 0).to_numpy()[last]
    ids = ids[last]
    n = min(max_users, int(np.ceil(share * len(ids))))
    top = np.argsort(-events, kind="stable")[:n]
    return [str(u) for u in ids[top]]


def compute_feeds(engine: Engine, store, users: list[str], cfg: ServingConfig, k: int,
                  feeds, batch: int = 1000, now_ms: int | None = None) -> dict:
    """Answer each user with ``engine`` and store the feeds that took no fallback.

    The request deadlines are a server's, not a batch job's: here they are generous (a busy
    machine must not turn feeds into fallbacks); they are not part of the feed's config key."""
    written = skipped = 0
    pending: dict[str, Feed] = {}
    key = config_key(cfg)
    cfg = dataclasses.replace(cfg, online_store_timeout_ms=5_000.0, rank_deadline_ms=60_000.0)
    for user_id in users:
        t = now_ms or int(time.time() * 1000)
        rows = store.fetch(user_id)  # the session mark the feed is valid for
        result = engine.recommend(RecommendQuery(user_id, k, ts=t), cfg, _Fixed(rows))
        if result.fallbacks or result.cold_start:
            skipped += 1
            continue
        pending[user_id] = Feed(tuple(result.item_ids), tuple(float(x) for x in result.scores),
                                tuple(int(x) for x in result.source_masks), engine.version,
                                key, t, session_mark(rows.session))
        if len(pending) >= batch:
            feeds.put(pending)
            written += len(pending)
            pending = {}
    if pending:
        feeds.put(pending)
        written += len(pending)
    return {"users": len(users), "written": written, "skipped": skipped}


class _Fixed:
    """The rows read once for a user, answered to the engine (so the feed and its session
    mark come from one read)."""

    def __init__(self, rows):
        self.rows = rows

    def fetch(self, user_id: str):
        return self.rows


def main(argv: list[str] | None = None) -> dict:
    ap = interval_parser(__doc__)
    ap.add_argument("--share", type=float, default=0.01, help="share of users with a feed")
    ap.add_argument("--max-users", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=ServingConfig.max_k, help="items per feed")
    ap.add_argument("--alias", default="champion")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--bundle-dir", type=Path, default=None, help="instead of the registry")
    args, paths, start, end = parse(ap, argv)
    from serving.server import local_source, registry_source

    if not (args.bundle_dir or args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        out = {"skipped": "no registry configured (MLFLOW_TRACKING_URI) and no --bundle-dir"}
        print(json.dumps(out))  # a data-only deployment: no champion to precompute feeds with
        return out
    t0 = time.perf_counter()
    fetch = (local_source(args.bundle_dir)[0] if args.bundle_dir
             else registry_source(args.tracking_uri, paths.bundle_cache)[0])
    try:
        bundle_dir, version = fetch(args.alias)
    except LookupError as exc:  # no model yet (before the first nightly run): nothing to do
        out = {"skipped": str(exc)}
        print(json.dumps(out))
        return out
    fs = feature_store.open_store(paths)
    # the server's new-item deltas too (serving.server's default for this state root)
    cfg = ServingConfig(deltas_dir=str(paths.models.resolve() / DELTAS))
    engine = Engine(bundle_dir, version, lambda ids: FO.ItemFeatureTable(fs, ids), cfg)
    users = active_users(paths.user_features, end, args.share, args.max_users)
    out = compute_feeds(engine, FeastStore(fs), users, cfg, args.k, open_feeds(fs))
    out.update(version=version, seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
