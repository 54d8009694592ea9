"""Nightly ANN build: the run's item vectors -> FAISS indexes in the bundle, recall logged.

extract: ``<models>/<run_id>/two_tower/item_vectors.npy`` (+ ``query_sample.npy``),
``als/item_factors.npy`` (+ ``als/user_factors.npy``) and ``sequence/item_vectors.npy``
(+ ``query_sample.npy``), whichever the run produced.
transform: ``tandem.models.ann.build_index`` — exact below 20k items, IVF above with nprobe tuned to
recall@500 >= 0.95 on the first half of the queries; recall@500 against exact search is then
MEASURED on the other half (mean, min, p5) and returned, so every build reports it.
load: ``index/main.faiss`` (metric "ip", two-tower), ``index/als.faiss`` and
``index/sequence.faiss`` (metric "mips", the inner-product -> L2 transform), each with a
``.json`` sidecar (kind, nprobe, transform, report).

    python -m jobs.build_index --start 2026-01-01T00:00:00 --end 2026-02-01T00:00:00
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tandem.config import Paths
from tandem.data.catalog import run_bundle_dir
from tandem.models.ann import EXACT_BELOW, build_index, measure_recall
from tandem.models.bundle import (
    ALS_ITEM_FACTORS,
    ALS_USER_FACTORS,
    INDEX_ALS,
    INDEX_MAIN,
    INDEX_SEQUENCE,
    SEQ_ITEM_VECTORS,
    SEQ_QUERY_SAMPLE,
    TT_ITEM_VECTORS,
)
from tandem.models.user_tower import QUERY_SAMPLE
from tandem.ops.job_cli import interval_parser, parse

INDEX_CONFIG: dict[str, Any] = {
    "k": 500,
    "target_recall": 0.95,
    "exact_below": EXACT_BELOW,
    "n_queries": 400,  # half tune nprobe, half measure recall
    "random_state": 0,
}
# index name -> (bundle path, item vectors, query vectors, metric)
PARTS = {
    "main": (INDEX_MAIN, TT_ITEM_VECTORS, QUERY_SAMPLE, "ip"),
    "als": (INDEX_ALS, ALS_ITEM_FACTORS, ALS_USER_FACTORS, "mips"),
    "sequence": (INDEX_SEQUENCE, SEQ_ITEM_VECTORS, SEQ_QUERY_SAMPLE, "mips"),
}


def _queries(bundle_dir: Path, rel: str, vectors: np.ndarray, n: int,
             rng: np.random.Generator) -> np.ndarray:
    """``n`` query vectors: from ``rel`` when the run saved it, else items themselves."""
    pool = np.load(bundle_dir / rel) if (bundle_dir / rel).exists() else vectors
    return pool[rng.choice(len(pool), size=min(n, len(pool)), replace=False)]


def build_one(bundle_dir: Path, name: str, cfg: dict[str, Any]) -> dict[str, float]:
    """Build, measure and save one index; returns ``<name>_*`` metrics (empty if no vectors)."""
    index_rel, vec_rel, query_rel, metric = PARTS[name]
    if not (bundle_dir / vec_rel).exists():
        return {}
    vectors = np.load(bundle_dir / vec_rel)
    rng = np.random.default_rng(cfg["random_state"])
    queries = _queries(bundle_dir, query_rel, vectors, cfg["n_queries"], rng)
    half = max(1, len(queries) // 2)
    index = build_index(vectors, metric=metric, exact_below=cfg["exact_below"],
                        target_recall=cfg["target_recall"], k=cfg["k"], queries=queries[:half],
                        random_state=cfg["random_state"])
    held_out = queries[half:] if len(queries) > half else queries
    recall = measure_recall(index, vectors, held_out, k=cfg["k"])
    index.report.update({f"measured_{k}": v for k, v in recall.items()})
    index.save(bundle_dir / index_rel)
    k = cfg["k"]
    return {f"{name}_items": float(index.ntotal), f"{name}_nprobe": float(index.nprobe),
            f"{name}_recall_at_{k}": recall["recall_mean"],
            f"{name}_recall_at_{k}_min": recall["recall_min"],
            f"{name}_recall_at_{k}_p5": recall["recall_p5"],
            f"{name}_ivf": float(index.kind == "ivf")}


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        run_id: str | None = None) -> dict[str, float]:
    """Build every index the run has vectors for; returns their recall@k and sizes.

    ``spark`` and ``start`` are unused (common job signature); the run is chosen by ``end`` /
    ``run_id``. Deterministic (seeded k-means and query sample); re-runs overwrite the files.
    """
    cfg = {**INDEX_CONFIG, **(cfg or {})}
    bundle_dir = run_bundle_dir(paths, end, run_id)
    out: dict[str, float] = {}
    for name in PARTS:
        out.update(build_one(bundle_dir, name, cfg))
    if not out:
        raise FileNotFoundError(f"no item vectors under {bundle_dir}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = interval_parser(__doc__)
    args, paths, start, end = parse(ap, argv)
    print(run(None, paths, start, end, run_id=args.run_id))


if __name__ == "__main__":
    main()
