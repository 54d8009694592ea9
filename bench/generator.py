"""Time the synthetic world generator; writes reports/bench_generator.json.

    python bench/generator.py --users 1000000 --items 100000 --events 50000000 [--out DIR]

Measures building users/items (``World.generate``), generating every event chunk (Arrow tables,
counted by type, then dropped), and with ``--out`` writing them as parquet partitions there
(``write_events_parquet``, by arrival hour). Peak RSS is the process's max resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc

from tandem import schema as s
from tandem.config import REPO_ROOT
from tandem.data.landing import write_events_parquet
from tandem.data.world import World
from tandem.data.world_config import ARRIVAL_TS, WorldConfig


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=50_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write parquet events here")
    ap.add_argument("--report", type=Path, default=REPO_ROOT / "reports" / "bench_generator.json")
    args = ap.parse_args(argv)

    cfg = WorldConfig(n_users=args.users, n_items=args.items, n_events_target=args.events,
                      days=args.days, seed=args.seed)
    c0, t0 = time.process_time(), time.perf_counter()
    world = World.generate(cfg)
    t_world = time.perf_counter() - t0

    counts: Counter[str] = Counter()
    t_gen = t_write = 0.0
    plan = world.chunks()
    t1 = time.perf_counter()
    for (day, part, _), table in zip(plan, world.generate_events(), strict=True):
        t2 = time.perf_counter()
        t_gen += t2 - t1
        vc = pc.value_counts(table[s.EVENT_TYPE]).to_pylist()
        counts.update({v["values"]: v["counts"] for v in vc})
        if args.out is not None:
            write_events_parquet(table, args.out, f"world-{args.seed}-d{day:03d}-p{part:03d}",
                                 by=ARRIVAL_TS)
        t1 = time.perf_counter()
        t_write += t1 - t2
    cpu = time.process_time() - c0
    total = sum(counts.values())
    report = {
        "config": {"users": args.users, "items": args.items, "events_target": args.events,
                   "days": args.days, "seed": args.seed, "chunks": len(plan)},
        "events": total,
        "events_by_type": dict(sorted(counts.items())),
        "world_build_s": round(t_world, 2),
        "events_generate_s": round(t_gen, 2),
        "events_write_parquet_s": round(t_write, 2) if args.out is not None else None,
        "total_s": round(t_world + t_gen + t_write, 2),
        # CPU seconds of this process: wall time on a shared machine includes waiting for cores
        "total_cpu_s": round(cpu, 2),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
        "events_per_s": round(total / max(t_gen, 1e-9)),
        "peak_rss_mib": round(peak_rss_mib()),
        "cpus": len(os.sched_getaffinity(0)),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
