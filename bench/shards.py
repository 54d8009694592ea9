"""Scatter-gather overhead: one FAISS index in process vs the same items in S shard processes.

``python bench/shards.py [--items 200000] [--shards 2] [--queries 2000]`` builds an IVF index of
``--items`` clustered unit vectors and its ``--shards`` shards (serving.shards), then answers the
same single-vector top-500 queries (serving's two-tower query) one at a time through both, and
writes ``reports/bench_shards.json``: per-query p50/p99 of each and the overlap of their answers.
On one machine the shards share its cores, so this measures the front's cost (pipes, the merge),
not the speed-up of spreading a big index over nodes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.shards import ShardedIndex, build_shards  # noqa: E402
from tandem.models.ann import build_index, recall_stats  # noqa: E402


def _latencies(search, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ms per query, ids [m, k]) answering one query at a time."""
    ms, ids = [], []
    for q in queries:
        t = time.perf_counter()
        ids.append(search(q[None], k)[1][0])
        ms.append((time.perf_counter() - t) * 1000.0)
    return np.array(ms), np.vstack(ids)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_shards.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(40, args.items // 500), args.dim))
    x = centers[rng.integers(0, len(centers), args.items)] + 0.4 * rng.standard_normal(
        (args.items, args.dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    queries = x[rng.choice(args.items, args.queries, replace=False)]
    whole = build_index(x, metric="ip", kind="ivf", k=args.k)
    with tempfile.TemporaryDirectory() as tmp:
        sharded = ShardedIndex(build_shards(x, args.shards, Path(tmp), kind="ivf", k=args.k))
        try:
            _latencies(sharded.search, queries[:50], args.k)  # warm both
            _latencies(whole.search, queries[:50], args.k)
            one_ms, one_ids = _latencies(whole.search, queries, args.k)
            many_ms, many_ids = _latencies(sharded.search, queries, args.k)
        finally:
            sharded.close()
    report = {"items": args.items, "dim": args.dim, "k": args.k, "queries": args.queries,
              "shards": args.shards,
              "one_index": {"p50_ms": round(float(np.percentile(one_ms, 50)), 3),
                            "p99_ms": round(float(np.percentile(one_ms, 99)), 3)},
              "sharded": {"p50_ms": round(float(np.percentile(many_ms, 50)), 3),
                          "p99_ms": round(float(np.percentile(many_ms, 99)), 3)},
              "overlap_with_one_index": recall_stats(many_ids, one_ids)["recall_mean"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
