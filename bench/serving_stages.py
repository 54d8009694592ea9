"""Where a computed answer's milliseconds go: ``Engine.recommend`` in-process, per stage.

``make bench`` measures the server end to end (gRPC, Redis, load generator on the same two
cores); this loads one engine on a bench world (``bench/serving.py`` builds and caches it under
``var/bench``) and times the request mix ``make bench`` sends (``bench.serving.make_requests``:
stored users drawn by activity, 5 % new ones) against an in-memory store holding the synthetic
users' profile and session rows, so the numbers are the engine's CPU alone. The stage deadlines
are off (a loaded machine would otherwise skip ranking past ``rank_deadline_ms`` and make the
answers depend on the load). Prints mean / p50 /
p99 per stage (``Result.stages_ms``) and the whole call; ``--cpu`` measures them in CPU time
of the request thread instead of wall time (on a machine other work shares, wall time counts
their time slices too); ``--profile`` adds cProfile's top
functions; ``--out`` writes the numbers and the answers (to compare two code versions on the
same requests: run it under each and diff the answers).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python bench/serving_stages.py \\
        --world var/bench/synthetic-1000000-5000000-150x15 [--requests 300] [--cpu] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import make_requests  # noqa: E402
from serving import result as result_module  # noqa: E402
from serving.config import ServingConfig  # noqa: E402
from serving.engine import Engine  # noqa: E402
from serving.item_table import ItemFeatures  # noqa: E402
from serving.stores import MemoryStore  # noqa: E402
from serving.validation import parse_recommend  # noqa: E402
from tandem.models import synthetic_bundle as S  # noqa: E402

WARM_UP = 64  # requests answered before timing (first touches of the mapped arrays)


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="a bench/serving.py world")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cpu", action="store_true",
                        help="stages in CPU time of the request thread (time.thread_time), not "
                             "wall time: the machine may be shared")
    args = parser.parse_args(argv)
    if args.cpu:  # StageClock reads serving.result's clock
        result_module.time = SimpleNamespace(perf_counter=time.thread_time)
    params = json.loads((args.world / "bundle" / "manifest.json").read_text())["params"]
    n_items, n_users = params["n_items"], params["n_users"]
    frame = pd.read_parquet(args.world / "item_features.parquet")
    cfg = ServingConfig(online_store_timeout_ms=1e6, rank_deadline_ms=1e6)
    t0 = time.perf_counter()
    engine = Engine(args.world / "bundle", "local",
                    lambda ids: ItemFeatures.from_frame(frame, pd.Index(ids)), cfg)
    print(f"engine loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    queries = [parse_recommend(r, cfg.max_k) for r in
               make_requests(WARM_UP + args.requests, np.arange(n_users), n_users)]
    rows = {q.user_id: S.user_rows(q.user_id, n_items) for q in queries
            if int(q.user_id[1:]) < n_users}
    store = MemoryStore({u: r[0] for u, r in rows.items()},
                        {u: r[1] for u, r in rows.items() if r[1] is not None})
    for q in queries[:WARM_UP]:
        engine.recommend(q, cfg, store)
    profile = cProfile.Profile() if args.profile else None
    stages: dict[str, list[float]] = {"total": []}
    answers = []
    if profile:
        profile.enable()
    clock = time.process_time if args.cpu else time.perf_counter
    for q in queries[WARM_UP:]:
        t0 = clock()
        result = engine.recommend(q, cfg, store)
        stages["total"].append((clock() - t0) * 1000)
        for name, ms in result.stages_ms.items():
            stages.setdefault(name, []).append(ms)
        answers.append(result.item_ids if not result.cold_start else None)  # cold: random
    if profile:
        profile.disable()
    report = {name: summary(v) for name, v in stages.items()}
    for name, s in report.items():
        print(f"{name:14s} n {len(stages[name]):5d}  mean {s['mean']:7.2f}  "
              f"p50 {s['p50']:7.2f}  p99 {s['p99']:7.2f} ms")
    if args.out:
        args.out.write_text(json.dumps({"stages_ms": report, "answers": answers}))
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    return report


if __name__ == "__main__":
    main()
