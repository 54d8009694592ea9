"""The command line shared by the jobs that need no Spark (``tandem.spark.entry`` is the Spark one):
``--start ISO --end ISO [--home DIR] [--master URL] [--run-id ID]``, as the DAG tasks pass them.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from tandem.config import Paths

# The pattern of the DAGs' name params (tandem.ops.orchestration.NAME), minus "." and "..".
_NAME = re.compile(r"(?!\.+$)[A-Za-z0-9._-]{1,64}")


def name_arg(text: str) -> str:
    """An argparse type for a value that becomes a directory name or a label (``--run-id``,
    ``--dataset``): letters, digits, ``.``, ``_``, ``-``; never a path or a shell word."""
    if not _NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a plain name (A-Z a-z 0-9 . _ -, 1-64): {text!r}")
    return text


def interval_parser(doc: str | None, run_id_help: str = "bundle directory name "
                    "(default: end date)") -> argparse.ArgumentParser:
    """A parser with the shared flags; a job adds its own flags before :func:`parse`."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    ap.add_argument("--start", required=True, type=datetime.fromisoformat)
    ap.add_argument("--end", required=True, type=datetime.fromisoformat)
    ap.add_argument("--home", type=Path, default=None, help="state root (default TANDEM_HOME)")
    ap.add_argument("--master", default=None, help="accepted for uniformity; no Spark is used")
    ap.add_argument("--run-id", type=name_arg, default=None, help=run_id_help)
    return ap


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None = None
          ) -> tuple[argparse.Namespace, Paths, datetime, datetime]:
    """(args, paths, start, end) with naive times read as UTC."""
    args = ap.parse_args(argv)
    paths = Paths(args.home) if args.home else Paths.default()
    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (args.start, args.end))
    return args, paths, start, end
