"""Train the two-tower model once a night on the run's positive pairs and export it to the bundle.

extract: the positive pairs of the run's int-coded training table (``lake/training/run_id=``,
``jobs/build_training_table.py``): ``user_idx, item_idx, positive_ts`` of pairs with a positive
engagement (``tandem.data.dataset.positives`` with ``play_dwell_ms``, applied in Spark), the
targets, and ``user_idx, item_idx, engaged_ts`` of the engaged pairs, the query histories
(``tandem.features.query_history``: what serving's user tower pools), read with pyarrow into numpy
-- the indexes are already the bundle's catalog rows; the catalog's content
columns (items created before ``end``) and the profile columns the user tower encodes.
transform: content and profile features (``tandem.features.tower_features``) in the bundle's order;
``tandem.models.two_tower.train_two_tower`` (int32 histories), with the night's tuned parameters
(``<models>/<run_id>/tuned.json``, ``jobs/tune.py``) over the defaults.
load: ``<models>/<run_id>/two_tower/{item_vectors.npy,user_tower.npz,query_sample.npy}``
(overwritten on re-run; ``run_id`` defaults to the end date, YYYYMMDD, like the DAG's).

Memory model at 5M users x 1M items x 50M events (~20M positive of ~30M engaged pairs): pairs
50M x 16 B = 0.8 GB, per-pair histories int32 20M x 21 x 4 B = 1.7 GB (and the int64 sort
keys of the engaged pairs, 30M x 8 B x 2 = 0.5 GB, while they are built), per-user last items
5M x 20 x 4 B = 0.4 GB, profiles 5M x 4 fields (~0.8 GB as pandas objects while encoded),
content 1M x ~40 x 4 B, the id embedding 1M x 64 x 4 B x 3 (Adam) = 0.8 GB: ~5.5 GB peak;
the pair reads are checked against ``TANDEM_DRIVER_BUDGET_MB``. Time: min(epochs x pairs /
batch_size, ``TwoTowerConfig.max_steps`` = 5,000) optimiser steps, so a night's fit is bounded
whatever the pairs (MovieLens-100K's 5 epochs are ~800 steps; at 20M pairs 5 epochs would be
~200k); at 1M items each step's Adam update also touches the whole id embedding.

    python -m jobs.train_two_tower --start 2026-01-01T00:00:00 --end 2026-02-01T00:00:00
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tandem.config import Paths
from tandem.data.catalog import run_bundle_dir
from tandem.data.lake import TrainingTable
from tandem.evaluation import tuning
from tandem.models.bundle import INDEX_MAIN, TT_ITEM_VECTORS
from tandem.models.tower_inputs import (
    TRAIN_CONFIG,
    catalog_frames,
    fit_tower,
    tower_pairs,
)
from tandem.models.user_tower import QUERY_SAMPLE
from tandem.ops.job_cli import interval_parser, parse


def extract(paths: Paths, end: datetime, run_id: str, user_fields: tuple[str, ...]
            ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(positive pairs: user_idx, item_idx, ts; engaged pairs, same columns; catalog content
    rows in bundle order; profiles in bundle order), all read with pyarrow, only the columns
    used."""
    table = TrainingTable.of(paths, run_id)
    return (*tower_pairs(table),
            *catalog_frames(paths, end, table, user_fields))


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

    ``spark`` and ``start`` are unused (common job signature; the table holds the window).
    Deterministic for a given lake, interval and ``cfg`` (seeded); a re-run overwrites the same
    files. The night's tuned parameters (``tandem.evaluation.tuning``, when ``jobs/tune.py`` chose
    some) overlay the defaults; ``cfg["two_tower"]`` overrides both.
    """
    cfg = {**TRAIN_CONFIG, **(cfg or {})}
    bundle_dir = run_bundle_dir(paths, end, run_id)
    cfg["two_tower"] = tuning.overlay({}, bundle_dir, tuning.TWO_TOWER, cfg["two_tower"])
    pairs, engaged, items, users = extract(paths, end, bundle_dir.name, cfg["user_fields"])
    model = fit_tower(pairs, items, users, cfg, history=engaged)
    load(model, bundle_dir, cfg["n_query_sample"], model.cfg.random_state)
    return {"interactions": len(pairs), "items": len(items), "users": len(users),
            "cold_items": int((model.item_counts == 0).sum()),
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
