"""ANN serving cost: tandem.models.ann indexes at catalog scale, single-query latency and
recall@500.

Synthetic data like ../shared/notes/perf-floor.md: ``--n`` items x ``--dim`` in 2,000 clusters
with power-law sizes; queries near 1-3 popular clusters. Two indexes, as serving holds them:
"main" (L2-normalised, inner product) and "als" (unnormalised, norms grow with popularity; the
inner-product -> L2 transform). Each is built with ``tandem.models.ann.build_index`` defaults
(nprobe tuned on 200 queries), then timed on 1,000 other queries, one per call, 1 thread, after 100
warm-up calls. Writes reports/bench_ann.json.

    OPENBLAS_NUM_THREADS=1 python bench/ann.py [--n 1000000] [--dim 64] [--k 500]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np

from tandem.models.ann import build_index, exact_top_k, recall_stats

REPORT = Path(__file__).resolve().parents[1] / "reports" / "bench_ann.json"


def synthetic(n: int, dim: int, n_clusters: int, n_queries: int, rng: np.random.Generator,
              noise: float = 0.35):
    """(items ``[n, dim]`` normalised, cluster popularity, queries ``[n_queries, dim]``).

    ``noise`` is the per-coordinate spread of items around their cluster centre (centres have
    norm ~sqrt(dim)); larger makes clusters overlap and IVF needs more probes.
    """
    pop = rng.pareto(1.1, n_clusters) + 1.0
    pop /= pop.sum()
    centers = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    labels = rng.choice(n_clusters, size=n, p=pop)
    items = centers[labels] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    picks = rng.choice(n_clusters, size=(n_queries, 3), p=pop)
    weights = rng.dirichlet(np.ones(3) * 0.5, size=n_queries).astype(np.float32)
    queries = (centers[picks] * weights[..., None]).sum(1)
    queries += noise / 2 * rng.normal(size=queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return items, pop[labels], queries.astype(np.float32)


def time_single(index, queries: np.ndarray, k: int, warmup: int = 100) -> dict[str, float]:
    """Median / p99 ms of one ``search`` call per query (1 thread)."""
    for q in queries[:warmup]:
        index.search(q[None, :], k)
    times = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times[i] = time.perf_counter() - t0
    return {"median_ms": float(np.median(times) * 1e3),
            "p99_ms": float(np.percentile(times, 99) * 1e3)}


def bench_one(name: str, vectors: np.ndarray, metric: str, tune: np.ndarray, test: np.ndarray,
              k: int) -> dict:
    faiss.omp_set_num_threads(2)
    t0 = time.perf_counter()
    index = build_index(vectors, metric=metric, k=k, queries=tune)
    build_s = time.perf_counter() - t0
    _, exact = exact_top_k(vectors, test, k)
    faiss.cvar.indexIVF_stats.reset()
    _, approx = index.search(test, k)
    scanned = faiss.cvar.indexIVF_stats.ndis / len(test) if index.kind == "ivf" else len(vectors)
    recall = recall_stats(approx, exact)
    faiss.omp_set_num_threads(1)
    latency = time_single(index, test, k)
    row = {"index": name, "metric": metric, "build_s": round(build_s, 2),
           "nlist": index.report.get("nlist"), "nprobe": index.nprobe,
           "tune_recall_mean": index.report["recall_mean"], "vectors_scanned_per_query": scanned,
           **recall, **latency}
    print(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.35, help="item spread around clusters")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    items, item_pop, queries = synthetic(args.n, args.dim, 2000, 1200, rng, args.noise)
    tune, test = queries[:200], queries[200:]
    # ALS-like norms: grow with popularity (up to 2x) times per-item lognormal spread
    norms = (1.0 + (item_pop / item_pop.max()) ** 0.5) * rng.lognormal(0.0, 0.35, len(items))
    als = items * norms[:, None].astype(np.float32)
    rows = [bench_one("main", items, "ip", tune, test, args.k),
            bench_one("als", als, "mips", tune, test, args.k)]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"n": args.n, "dim": args.dim, "k": args.k, "threads": 1,
                                  "noise": args.noise,
                                  "load_avg_1m_at_end": os.getloadavg()[0], "cpus": os.cpu_count(),
                                  "results": rows}, indent=2))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
