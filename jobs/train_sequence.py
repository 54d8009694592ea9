"""Nightly session sequence model (SASRec-style, ``tandem.models.sequence_train``) from the training
table, exported into the run's bundle.

extract: the night's int-coded training table (``tandem.data.lake.TrainingTable``), the engaged
pairs only, four columns (user_idx, item_idx, engaged_ts, positive_ts) read with pyarrow.
transform: each user's engaged items in order of first engagement -- the query history serving
asks the model with (``tandem.features.query_history``) -- cut into rows of ``max_len + 1`` items
from the newest end, the positive ones the targets; train the Transformer
(``tandem.models.sequence_train.train_sequence``).
load: ``sequence/item_vectors.npy`` + ``sequence/model.npz`` (``tandem.models.bundle``) and
``sequence/query_sample.npy``, the query vectors of a sample of users (their query histories at
the end of the window) from which ``jobs/build_index.py`` tunes ``index/sequence.faiss``.

Memory model at 5M users x 1M items x 50M events (~30M pairs, ~25M engaged): the four columns
25M x 24 B = 600 MB (checked against ``TANDEM_DRIVER_BUDGET_MB``), the sort order and chunk keys
as much again; the training rows are capped at ``max_sequences`` (1M x 51 x 4 B = 200 MB); the
model is the item embedding 1M x 64 x 4 B = 256 MB plus Adam's two moments (x3) and a few
hundred KB of Transformer weights. Time: min(epochs x rows / batch_size, ``max_steps``) steps
over [128, 50, 64] batches, ~0.1 s each on one quiet core (~0.25 s under load): the step budget
(2,000) bounds a night at ~3-4 min whatever the rows. MovieLens-100K's 30 epochs are ~570 steps;
the 1M-event bench rung's 30 epochs would be 4,560 (19,333 rows), past 8 min before the budget.

    python -m jobs.train_sequence --start 2026-01-01T00:00:00 --end 2026-02-01T00:00:00
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import numpy as np

from tandem.config import Paths
from tandem.data.catalog import run_bundle_dir
from tandem.data.lake import ENGAGED_TS, ITEM_IDX, POSITIVE_TS, USER_IDX, TrainingTable
from tandem.features import query_history as QH
from tandem.models.bundle import SEQ_QUERY_SAMPLE
from tandem.ops.job_cli import interval_parser, parse

TRAIN_CONFIG: dict[str, Any] = {
    "sequence": {},  # SequenceConfig overrides
    "n_query_sample": 400,  # user queries saved to tune and measure the sequence ANN index
}


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        run_id: str | None = None) -> dict[str, Any]:
    """Train and export; returns counts and the final training loss.

    ``spark`` and ``start`` are unused (common job signature; the table holds the window).
    Deterministic for a given table and ``cfg`` (seeded, one thread); a re-run overwrites the
    same files.
    """
    from tandem.models.sequence_train import SequenceConfig, train_sequence

    cfg = {**TRAIN_CONFIG, **(cfg or {})}
    bundle_dir = run_bundle_dir(paths, end, run_id)
    table = TrainingTable.of(paths, bundle_dir.name)
    cols = table.interactions([USER_IDX, ITEM_IDX, ENGAGED_TS, POSITIVE_TS], engaged_only=True)
    users, items = cols[USER_IDX].astype(np.int64), cols[ITEM_IDX].astype(np.int64)
    ts = cols[ENGAGED_TS].astype(np.int64)
    positive = ~np.isnan(cols[POSITIVE_TS].astype(np.float64))
    seq_cfg = SequenceConfig(**cfg["sequence"])
    model = train_sequence(users, items, ts, table.shape()[1], seq_cfg, positive)
    model.export(bundle_dir)
    # queries: a sample of users' query histories at the end of the window, as serving asks
    active = np.unique(users)
    rng = np.random.default_rng(seq_cfg.random_state)
    pick = np.sort(rng.choice(active, size=min(cfg["n_query_sample"], len(active)),
                              replace=False))
    mine = np.isin(users, pick)
    newest = QH.query_items(np.searchsorted(pick, users[mine]), items[mine], ts[mine],
                            len(pick), min(QH.QUERY_LEN, seq_cfg.max_len))
    np.save(bundle_dir / SEQ_QUERY_SAMPLE, model.encoder().encode_batch(newest))
    return {"positives": int(positive.sum()), "engaged": len(users), "rows": model.n_rows,
            "items": table.shape()[1],
            "final_loss": float(model.loss_history[-1]) if model.loss_history else float("nan"),
            "bundle_dir": str(bundle_dir)}


def main(argv: list[str] | None = None) -> None:
    args, paths, start, end = parse(interval_parser(__doc__), argv)
    print(json.dumps(run(None, paths, start, end, run_id=args.run_id)))


if __name__ == "__main__":
    main()
