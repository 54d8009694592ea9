"""Fit implicit ALS once a night on the run's int-coded training table and save the factors.

extract: ``lake/training/run_id=<run_id>/interactions`` (``jobs/build_training_table.py``), only
    the columns ``user_idx, item_idx, weight``, read with pyarrow straight into numpy; the
    confidence (``tandem.models.als.event_confidence``, summed per pair and capped) was computed
there. transform: a users x items float32 CSR in the bundle's catalog order (the table's indexes are
    the rows of ``items.parquet``/``users.parquet``), fit with ``tandem.models.als.fit_als`` with
    the night's tuned parameters (``<models>/<run_id>/tuned.json``, ``jobs/tune.py``) over the
    defaults.
load: ``<models>/<run_id>/als/{user_factors,item_factors}.npy`` (``tandem.models.bundle.ALS_*``) and
    ``als/meta.json`` (overwritten on re-run). The ranker, the index build and the evaluation
    read these factors; nothing else fits ALS in the nightly chain.

Memory model at 5M users x 1M items x 50M events (~30M pairs): the three columns in numpy,
30M x 12 B = 0.36 GB, the CSR twice that while built, implicit's factors
(5M + 1M) x 32 x 4 B = 0.77 GB plus its per-thread solver state: ~2.5 GB peak, checked against
``TANDEM_DRIVER_BUDGET_MB`` before anything is read.

    python -m jobs.train_als --start 2026-01-01T00:00:00 --end 2026-01-29T00:00:00 \
        --run-id 20260129
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tandem.config import Paths, within_driver_budget
from tandem.data.catalog import run_bundle_dir
from tandem.data.lake import TrainingTable
from tandem.evaluation import tuning
from tandem.models import als as A
from tandem.models.bundle import ALS_ITEM_FACTORS, ALS_USER_FACTORS
from tandem.ops.job_cli import interval_parser, parse

# float32 bytes per factor row kept by implicit (user and item factors, plus a solver copy)
FACTOR_COPIES = 2


def load(factors: A.AlsFactors, bundle_dir: Path, counts: dict[str, int],
         cfg: dict[str, Any]) -> None:
    """Write the factors and ``meta.json`` (overwrites)."""
    for rel, array in ((ALS_USER_FACTORS, factors.user_factors),
                       (ALS_ITEM_FACTORS, factors.item_factors)):
        (bundle_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(bundle_dir / rel, array)
    model_cfg = {k: v for k, v in cfg.items() if k != "event_weights"}
    (bundle_dir / ALS_ITEM_FACTORS).with_name("meta.json").write_text(json.dumps(
        {**counts, "config": model_cfg, "event_weights": cfg["event_weights"]}, indent=2))


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        run_id: str | None = None) -> dict[str, int]:
    """Fit on the run's table and save into ``<models>/<run_id>``; returns counts.

    ``spark`` and ``start`` are unused (common job signature; the table holds the window).
    Deterministic for a fixed table and ``cfg`` (seeded, one BLAS thread); re-runs overwrite.
    The night's tuned parameters (``tandem.evaluation.tuning``) overlay the defaults; ``cfg``
    overrides both. ``als/meta.json`` records the configuration actually fitted (fold-in must use
    the same).
    """
    bundle_dir = run_bundle_dir(paths, end, run_id)
    cfg = tuning.overlay(A.ALS_CONFIG, bundle_dir, tuning.ALS, cfg)
    table = TrainingTable.of(paths, bundle_dir.name)
    n_users, n_items = table.shape()
    within_driver_budget((n_users + n_items) * cfg["factors"] * 4 * FACTOR_COPIES,
                         f"ALS factors of {n_users:,} users x {n_items:,} items")
    matrix = table.matrix()
    factors = A.fit_als(matrix, pd.RangeIndex(n_users), pd.RangeIndex(n_items), cfg)
    counts = {"pairs": int(matrix.nnz), "users": n_users, "items": n_items}
    load(factors, bundle_dir, counts, cfg)
    return counts


def main(argv: list[str] | None = None) -> None:
    args, paths, start, end = parse(interval_parser(__doc__), argv)
    print(json.dumps(run(None, paths, start, end, run_id=args.run_id)))


if __name__ == "__main__":
    main()
