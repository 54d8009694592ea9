"""Train the two-tower model on one interval's positive engagements and export it to the bundle.

extract: lake events with ``start <= ts < end``, the catalog (items created before ``end``) and
user profiles, read with pyarrow (torch training needs no Spark; ``spark`` may be None).
transform: positives (``tandem.dataset.positives``) -> (user_idx, item_idx, ts) in the bundle's
catalog order (``tandem.catalog``); content and profile features (``tandem.tower_features``);
``tandem.two_tower.train_two_tower``.
load: ``<models>/<run_id>/two_tower/{item_vectors.npy,user_tower.npz,query_sample.npy}``
(overwritten on re-run; ``run_id`` defaults to the end date, YYYYMMDD, like the DAG's).

    python -m jobs.train_two_tower --start 2026-01-01T00:00:00 --end 2026-02-01T00:00:00
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from tandem import schema as s
from tandem.bundle import INDEX_MAIN, TT_ITEM_VECTORS
from tandem.catalog import load_or_write, run_bundle_dir
from tandem.config import Paths
from tandem.dataset import positives
from tandem.job_cli import interval_parser, parse
from tandem.tower_features import ItemContentSpec, UserFeatureSpec
from tandem.user_tower import QUERY_SAMPLE

TRAIN_CONFIG: dict[str, Any] = {
    "two_tower": {},  # TwoTowerConfig overrides
    "play_dwell_ms": 30_000,  # a play this long is a positive engagement
    "user_fields": (s.AGE_BUCKET, s.GENDER, s.OCCUPATION, s.COUNTRY),
    "n_query_sample": 400,  # user vectors saved to tune and measure the main ANN index
}
EVENT_FIELDS = (s.EVENT_TYPE, s.USER_ID, s.ITEM_ID, s.TS, s.VALUE, s.DWELL_MS)


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def extract(paths: Paths, start: datetime, end: datetime
            ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(events in [start, end), items created before end, user profiles), as pandas."""
    lo, hi = _ms(start), _ms(end)
    day_lo = start.astimezone(UTC).strftime("%Y-%m-%d")  # no event arrives before it happens
    events = ds.dataset(paths.events, format="parquet", partitioning="hive").to_table(
        columns=list(EVENT_FIELDS),
        filter=(ds.field(s.DATE) >= day_lo) & (ds.field(s.TS) >= lo) & (ds.field(s.TS) < hi)
    ).to_pandas()
    items = ds.dataset(paths.items, format="parquet").to_table(
        filter=ds.field(s.CREATED_AT) < hi).to_pandas()
    users = ds.dataset(paths.users, format="parquet").to_table().to_pandas()
    return events, items, users


def transform(events: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame,
              catalog: pd.DataFrame, user_order: pd.DataFrame, cfg: dict[str, Any]):
    """Train on the positives and return the model (``tandem.two_tower.TwoTowerModel``)."""
    from tandem.two_tower import TwoTowerConfig, train_two_tower

    item_index = pd.Index(catalog[s.ITEM_ID])
    user_index = pd.Index(user_order[s.USER_ID])
    pos = events.loc[positives(events, cfg["play_dwell_ms"])]
    pairs = pd.DataFrame({"user_idx": user_index.get_indexer(pos[s.USER_ID].astype(str)),
                          "item_idx": item_index.get_indexer(pos[s.ITEM_ID].astype(str)),
                          "ts": pos[s.TS].to_numpy(np.int64)})
    pairs = pairs[(pairs["user_idx"] >= 0) & (pairs["item_idx"] >= 0)]
    item_rows = items.drop_duplicates(s.ITEM_ID).set_index(s.ITEM_ID).reindex(item_index)
    genres = [g if isinstance(g, (list, np.ndarray)) else [] for g in item_rows[s.GENRES]]
    item_spec = ItemContentSpec.fit(genres)
    content = item_spec.encode(genres, item_rows[s.RELEASE_YEAR].tolist())
    fields = [f for f in cfg["user_fields"] if f in users.columns]
    profiles = (users.assign(**{s.USER_ID: users[s.USER_ID].astype(str)})
                .drop_duplicates(s.USER_ID).set_index(s.USER_ID).reindex(user_index))
    user_spec = UserFeatureSpec.fit(profiles, fields)
    return train_two_tower(pairs, content, user_spec.encode(profiles.reset_index()),
                           TwoTowerConfig(**cfg["two_tower"]), n_users=len(user_index),
                           item_spec=item_spec, user_spec=user_spec), len(pairs)


def load(model, bundle_dir: Path, n_query_sample: int, random_state: int) -> dict[str, Path]:
    """Export the towers and a sample of active users' vectors (ANN tuning queries)."""
    written = model.export(bundle_dir)
    active = np.flatnonzero(model.histories[:, 0] >= 0)
    rng = np.random.default_rng(random_state)
    pick = np.sort(rng.choice(active, size=min(n_query_sample, len(active)), replace=False))
    sample = model.user_vectors(model.user_feats[pick], model.histories[pick])
    np.save(bundle_dir / QUERY_SAMPLE, sample.astype(np.float32))
    return {**written, "query_sample": bundle_dir / QUERY_SAMPLE}


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        run_id: str | None = None) -> dict[str, Any]:
    """Train and export; returns counts and the final training loss.

    ``spark`` is unused (accepted for the common job signature). Deterministic for a given lake,
    interval and ``cfg`` (seeded); a re-run overwrites the same files.
    """
    cfg = {**TRAIN_CONFIG, **(cfg or {})}
    events, items, users = extract(paths, start, end)
    bundle_dir = run_bundle_dir(paths, end, run_id)
    catalog, user_order = load_or_write(bundle_dir, items, users, events)
    model, n_pairs = transform(events, items, users, catalog, user_order, cfg)
    load(model, bundle_dir, cfg["n_query_sample"], model.cfg.random_state)
    return {"events": len(events), "interactions": n_pairs, "items": len(catalog),
            "users": len(user_order), "cold_items": int((model.item_counts == 0).sum()),
            "final_loss": float(model.loss_history[-1]) if model.loss_history else float("nan"),
            "bundle_dir": str(bundle_dir)}


def skip(paths: Paths, end: datetime, run_id: str | None = None) -> dict[str, Any]:
    """No two-tower for this run: remove any two-tower part an earlier attempt of the same run
    left in its bundle (vectors, tower, main index), so the bundle is consistently ALS-only."""
    bundle_dir = run_bundle_dir(paths, end, run_id)
    removed = [p for p in (bundle_dir / TT_ITEM_VECTORS).parent.glob("*") if p.is_file()]
    removed += [p for p in (bundle_dir / INDEX_MAIN).parent.glob(Path(INDEX_MAIN).name + "*")]
    for path in removed:
        path.unlink()
    return {"skipped": 1, "removed": len(removed), "bundle_dir": str(bundle_dir)}


def main(argv: list[str] | None = None) -> None:
    ap = interval_parser(__doc__)
    ap.add_argument("--skip", action="store_true",
                    help="train nothing; the bundle serves ALS-only (DAG param skip_two_tower)")
    args, paths, start, end = parse(ap, argv)
    if args.skip:
        print(skip(paths, end, args.run_id))
        return
    print(run(None, paths, start, end, run_id=args.run_id))


if __name__ == "__main__":
    main()
