"""The command line every Spark job shares: ``--start ISO --end ISO [--home DIR] [--master URL]
[--run-id ID]`` (the DAG passes ``--run-id`` to every job; interval jobs ignore it).

``python -m jobs.<name> ...`` and ``spark-submit jobs/<name>.py ...`` both end here: parse the
interval, build the session, call the job's ``run`` and print its counts as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tandem.config import Paths
from tandem.ops.job_cli import name_arg
from tandem.spark.io import utc
from tandem.spark.session import get_spark


def _iso(text: str) -> datetime:
    return utc(datetime.fromisoformat(text))


def job_main(name: str, run: Callable[..., dict[str, Any]], cfg: Any,
             argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the shared flags, run the job once over ``[start, end)`` and print its counts."""
    parser = argparse.ArgumentParser(prog=f"jobs.{name}", description=run.__doc__)
    parser.add_argument("--start", type=_iso, required=True, help="interval start, ISO, UTC")
    parser.add_argument("--end", type=_iso, required=True, help="interval end (exclusive)")
    parser.add_argument("--home", type=Path, default=None, help="state root (TANDEM_HOME)")
    parser.add_argument("--master", default=None, help="Spark master (SPARK_MASTER, local[*])")
    parser.add_argument("--run-id", type=name_arg, default=None,
                        help="the DAG run's id; accepted so every job shares one command line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    spark = get_spark(f"tandem-{name}", master=args.master)
    counts = run(spark, paths, args.start, args.end, cfg)
    print(json.dumps(counts, default=str))
    return counts
