"""Wall time of the Spark batch jobs on MovieLens-100K (ingest -> labels -> negatives).

Lands every rating as a JSON line by its hour (``tandem.data.landing``), then runs
``jobs.ingest_events``, ``jobs.build_labels`` (ratings mode) and ``jobs.negative_sampling`` once
over the whole span and writes the times and counts to ``reports/bench_spark_jobs.json``.

Run: ``python bench/spark_jobs.py [--data ../shared/data/ml-100k] [--master local[*]]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from jobs import build_labels, ingest_events, negative_sampling
from tandem import schema as s
from tandem.config import REPO_ROOT, Paths, movielens_100k_dir
from tandem.data.landing import write_landing_events
from tandem.data.movielens import load_100k
from tandem.spark.session import get_spark


def _day(ms: int) -> datetime:
    return datetime.fromtimestamp(ms // 86_400_000 * 86_400, tz=UTC)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=movielens_100k_dir())
    parser.add_argument("--master", default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench_spark_jobs.json")
    args = parser.parse_args()

    ds = load_100k(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths(Path(tmp))
        t = time.perf_counter()
        files = write_landing_events(ds.events, paths.landing_events, "ml100k")
        land_s = time.perf_counter() - t
        start = _day(int(ds.events[s.TS].min()))
        end = _day(int(ds.events[s.TS].max())) + timedelta(days=1)
        t = time.perf_counter()
        spark = get_spark("tandem-bench", master=args.master)
        session_s = time.perf_counter() - t
        report = {"dataset": ds.name, "events": len(ds.events), "landing_files": len(files),
                  "interval": [start.isoformat(), end.isoformat()],
                  "master": spark.sparkContext.master, "cpus": os.cpu_count(),
                  "loadavg_before": os.getloadavg(), "python": platform.python_version(),
                  "landing_write_s": round(land_s, 2), "session_start_s": round(session_s, 2),
                  "jobs": {}}
        for name, job in (("ingest_events", ingest_events), ("build_labels", build_labels),
                          ("negative_sampling", negative_sampling)):
            t = time.perf_counter()
            counts = job.run(spark, paths, start, end)
            report["jobs"][name] = {"wall_s": round(time.perf_counter() - t, 2),
                                    "counts": counts}
        report["loadavg_after"] = os.getloadavg()
        spark.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
