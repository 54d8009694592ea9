"""The ALS index before and after issue 17's tuning, on the queries serving sends, side by side.

World: ``tandem.models.synthetic_bundle.world_vectors`` (the bench's synthetic world,
``--items`` x 64, ``--items / 500`` clusters, ALS factors for one user in five, like
``make bench``'s 1M of 5M).
Queries: ``--queries`` requests of users drawn uniformly from the world, each made as the
engine makes it (``tandem.models.als.session_query``, which ``serving.session_retrieval`` calls: the
nightly vector refolded with the session's items, or the session alone for a user without
factors), by ``synthetic_bundle.als_queries`` with another seed than the tuning sample.

- before: the previous build (IVF ``4 sqrt(n)`` lists, nprobe tuned to recall@500 >= 0.96 on
  200 nightly user vectors) searched as before (the raw inner-product -> L2 transform);
- before_scaled_queries_only: that index searched by ``AnnIndex.search`` (queries scaled to M);
- before_at_nprobe_reaching_0.95: the old search at the smallest nprobe of ``NPROBE_GRID``
  reaching recall@200 0.95 on these queries (what the old index costs at the target);
- after: ``tandem.models.ann.tune_index`` on ``synthetic_bundle.als_queries`` at k = 200 (what
  ``make bench``'s bundle now holds), searched by ``AnnIndex.search``.

Recall@200 against exact inner product; latency of one query per call, one thread, the four
searches alternating query by query so all see the same machine load. Prints JSON and writes
reports/bench_ann_tuning.json.

    OPENBLAS_NUM_THREADS=1 python bench/ann_tuning.py [--items 200000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tandem.models import synthetic_bundle as S  # noqa: E402
from tandem.models.ann import (  # noqa: E402
    NPROBE_GRID,
    build_index,
    exact_top_k,
    recall_stats,
    tune_index,
)

REPORT = Path(__file__).resolve().parents[1] / "reports" / "bench_ann_tuning.json"
K = S.ALS_K


def old_search(index, queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
    """The search before the queries were scaled: (query, 0) into the transformed index."""
    raw = np.hstack([queries, np.zeros((len(queries), 1), np.float32)])
    return index.index.search(raw, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]


def old_nprobe_at_target(index, queries: np.ndarray, exact: np.ndarray, target: float) -> int:
    """The smallest nprobe of the grid at which the old search reaches ``target`` recall."""
    for nprobe in [p for p in NPROBE_GRID if p >= index.nprobe] + [index.report["nlist"]]:
        if recall_stats(old_search(index, queries, K, nprobe), exact)["recall_mean"] >= target:
            return nprobe
    return index.report["nlist"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    spec = S.SyntheticSpec(n_items=args.items, n_users=5 * (args.items // 5),
                           n_als_users=args.items // 5, dim=64, als_dim=64,
                           n_clusters=max(40, args.items // 500))
    world = S.world_vectors(spec, np.random.default_rng(spec.seed))
    items, users = world["als_items"], world["als_users"]
    # the requests measured: other users than the ones tuned on (another seed)
    queries = S.als_queries(spec, items, users, args.queries, seed=spec.seed + 1)
    t0 = time.perf_counter()
    before = build_index(items, metric="mips", random_state=spec.seed, queries=users[:200])
    t1 = time.perf_counter()
    after = tune_index(items, S.als_queries(spec, items, users, seed=spec.seed), K, metric="mips",
                       random_state=spec.seed)
    t2 = time.perf_counter()
    _, exact = exact_top_k(items, queries, K)
    at_target = old_nprobe_at_target(before, queries, exact, 0.95)
    searches = {"before": lambda q: old_search(before, q, K, before.nprobe),
                "before_scaled_queries_only": lambda q: before.search(q, K)[1],
                "before_at_nprobe_reaching_0.95": lambda q: old_search(before, q, K, at_target),
                "after": lambda q: after.search(q, K)[1]}
    faiss.omp_set_num_threads(1)
    times = {name: np.empty(len(queries)) for name in searches}
    for i, q in enumerate(queries):
        for name, search in searches.items():
            start = time.perf_counter()
            search(q[None])
            times[name][i] = time.perf_counter() - start
    rows = {}
    for name, index, build_s in (("before", before, t1 - t0),
                                 ("before_scaled_queries_only", before, t1 - t0),
                                 ("before_at_nprobe_reaching_0.95", before, t1 - t0),
                                 ("after", after, t2 - t1)):
        faiss.cvar.indexIVF_stats.reset()
        recall = recall_stats(searches[name](queries), exact)
        nprobe = at_target if name.endswith("0.95") else index.nprobe
        rows[name] = {"nlist": index.report["nlist"], "nprobe": nprobe,
                      "vectors_compared_per_query": index.report["nlist"]
                      + faiss.cvar.indexIVF_stats.ndis / len(queries),
                      "build_s": round(build_s, 1), **recall,
                      "latency_ms_p50": float(np.median(times[name]) * 1e3),
                      "latency_ms_p99": float(np.percentile(times[name], 99) * 1e3)}
    out = {"items": args.items, "dim": 64, "k": K, "queries": len(queries),
           "threads": 1, "load_avg_1m_at_end": os.getloadavg()[0],
           "cpus": os.cpu_count(), "after_candidates": after.report["candidates"], **rows}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
