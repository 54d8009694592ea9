"""Nightly ANN build: the run's item vectors -> FAISS indexes in the bundle, tuned on the
queries serving sends, recall and latency logged.

extract: ``<models>/<run_id>/two_tower/item_vectors.npy`` (+ ``query_sample.npy``, user-tower
vectors), ``als/item_factors.npy`` (+ ``als/user_factors.npy``, ``als/meta.json``) and
``sequence/item_vectors.npy`` (+ ``query_sample.npy``), whichever the run produced.
transform: the queries each index serves, sampled from the run's users (never items):
- als: ``tandem.models.als.serving_queries`` -- nightly user vectors, those folded in with a
  session, and sessions folded in alone (users not in the build), as
  ``serving.session_retrieval`` does;
- main: user-tower vectors and session centroids (the mean of 5 session items), the engine's
  two queries of this index;
- sequence: the encoder's outputs for sampled users' histories (already what serving sends).
Sessions come from ``tandem.models.ann.sample_sessions`` (items from each user's own top 100).
``tandem.models.ann.tune_index`` then picks the cheapest IVF (nlist, nprobe) reaching
recall@k >= 0.95 at the ``k`` serving asks each index for (exact below 20k items), and measures
recall (mean, min, p5) and single-thread latency on the held-out half of the queries.
load: ``index/main.faiss`` (metric "ip", two-tower), ``index/als.faiss`` and
``index/sequence.faiss`` (metric "mips", the inner-product -> L2 transform), each with a
``.json`` sidecar (kind, nprobe, transform, report: chosen setting, candidates, measured recall
and latency); serving loads the sidecar with the index and searches at its nprobe.

Memory model at 1M items x 64: the item vectors (256 MB), two candidate IVF indexes at a time
(~260 MB each), exact top-k of 400 queries (FAISS, blocked), user factors memory-mapped
(only the sampled rows are read). Once a night, ~3 k-means per index (nlist 2, 4, 8 sqrt(n)).

    python -m jobs.build_index --start 2026-01-01T00:00:00 --end 2026-02-01T00:00:00
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tandem.config import Paths
from tandem.data.catalog import run_bundle_dir
from tandem.features.query_history import QUERY_LEN
from tandem.models import als as A
from tandem.models.ann import EXACT_BELOW, sample_sessions, tune_index
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
    "target_recall": 0.95,
    "exact_below": EXACT_BELOW,
    "n_queries": 400,  # half tune (nlist, nprobe), half measure recall and latency
    "random_state": 0,
}
CENTROID_ITEMS = 5  # the engine's session query: the mean of the newest 5 items' vectors


def _als_queries(bundle_dir: Path, items: np.ndarray, users: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    meta = (bundle_dir / ALS_ITEM_FACTORS).with_name("meta.json")
    cfg = {**A.ALS_CONFIG, **(json.loads(meta.read_text()).get("config", {})
                              if meta.exists() else {})}
    return A.serving_queries(items, users, sample_sessions(items, users, QUERY_LEN, rng), rng,
                             cfg)


def _two_tower_queries(bundle_dir: Path, items: np.ndarray, users: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    out = users.copy()
    sessions = sample_sessions(items, users, QUERY_LEN, rng)
    for i in range(len(users) // 2, len(users)):
        out[i] = items[sessions[i][:CENTROID_ITEMS]].mean(axis=0)
    return out[rng.permutation(len(out))]


def _as_sampled(bundle_dir: Path, items: np.ndarray, users: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    return users


# index name -> (bundle path, item vectors, user queries, metric, serving k, queries of users).
# k: ServingConfig's n_two_tower (= max with n_session, one search), n_als, n_sequence
# (jobs may not import serving; tests/test_ann.py checks they agree).
PARTS: dict[str, tuple[str, str, str, str, int, Callable[..., np.ndarray]]] = {
    "main": (INDEX_MAIN, TT_ITEM_VECTORS, QUERY_SAMPLE, "ip", 500, _two_tower_queries),
    "als": (INDEX_ALS, ALS_ITEM_FACTORS, ALS_USER_FACTORS, "mips", 200, _als_queries),
    "sequence": (INDEX_SEQUENCE, SEQ_ITEM_VECTORS, SEQ_QUERY_SAMPLE, "mips", 200, _as_sampled),
}


def _users(bundle_dir: Path, rel: str, vectors: np.ndarray, n: int,
           rng: np.random.Generator) -> np.ndarray:
    """``n`` sampled user query vectors from ``rel`` (memory-mapped: only those rows are read);
    items themselves when the run saved none (an older run)."""
    pool = np.load(bundle_dir / rel, mmap_mode="r") if (bundle_dir / rel).exists() else vectors
    return np.asarray(pool[np.sort(rng.choice(len(pool), size=min(n, len(pool)),
                                              replace=False))], dtype=np.float32)


def build_one(bundle_dir: Path, name: str, cfg: dict[str, Any]) -> dict[str, float]:
    """Build, measure and save one index; returns ``<name>_*`` metrics (empty if no vectors)."""
    index_rel, vec_rel, user_rel, metric, k, queries_of = PARTS[name]
    if not (bundle_dir / vec_rel).exists():
        return {}
    vectors = np.load(bundle_dir / vec_rel)
    rng = np.random.default_rng(cfg["random_state"])
    users = _users(bundle_dir, user_rel, vectors, cfg["n_queries"], rng)
    queries = queries_of(bundle_dir, vectors, users, rng)
    index = tune_index(vectors, queries, k, metric=metric, target_recall=cfg["target_recall"],
                       exact_below=cfg["exact_below"], random_state=cfg["random_state"])
    index.save(bundle_dir / index_rel)
    r = index.report
    return {f"{name}_items": float(index.ntotal), f"{name}_nprobe": float(index.nprobe),
            f"{name}_nlist": float(r.get("nlist", 0)),
            f"{name}_recall_at_{k}": r["measured_recall_mean"],
            f"{name}_recall_at_{k}_min": r["measured_recall_min"],
            f"{name}_recall_at_{k}_p5": r["measured_recall_p5"],
            f"{name}_latency_ms_p50": r["latency_ms_p50"],
            f"{name}_latency_ms_p99": r["latency_ms_p99"],
            f"{name}_ivf": float(index.kind == "ivf")}


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        run_id: str | None = None) -> dict[str, float]:
    """Build every index the run has vectors for; returns their recall@k, latency and sizes.

    ``spark`` and ``start`` are unused (common job signature); the run is chosen by ``end`` /
    ``run_id``. Deterministic choice (seeded k-means, query sample and sessions; chosen by
    vectors compared, not by timing); re-runs overwrite the files.
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
