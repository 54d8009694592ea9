"""The command line shared by the jobs that need no Spark (``tandem.spark.entry`` is the Spark one):
``--start ISO --end ISO [--home DIR] [--master URL] [--run-id ID]``, as the DAG tasks pass them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from tandem.config import Paths


def interval_parser(doc: str | None, run_id_help: str = "bundle directory name "
                    "(default: end date)") -> argparse.ArgumentParser:
    """A parser with the shared flags; a job adds its own flags before :func:`parse`."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    ap.add_argument("--start", required=True, type=datetime.fromisoformat)
    ap.add_argument("--end", required=True, type=datetime.fromisoformat)
    ap.add_argument("--home", type=Path, default=None, help="state root (default TANDEM_HOME)")
    ap.add_argument("--master", default=None, help="accepted for uniformity; no Spark is used")
    ap.add_argument("--run-id", default=None, help=run_id_help)
    return ap


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None = None
          ) -> tuple[argparse.Namespace, Paths, datetime, datetime]:
    """(args, paths, start, end) with naive times read as UTC."""
    args = ap.parse_args(argv)
    paths = Paths(args.home) if args.home else Paths.default()
    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (args.start, args.end))
    return args, paths, start, end
