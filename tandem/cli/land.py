"""MovieLens landed where the pipeline picks it up: the first step of ``make demo`` and of
``python -m tandem.cli data-jobs`` (both call :func:`load_movielens_into_lake`)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from tandem.config import Paths

console = Console(highlight=False)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def load_movielens_into_lake(paths: Paths, folder: Path) -> tuple[str, str]:
    """Land MovieLens ratings as raw events (arrival = event time) plus the catalog and users.

    Returns the [start, end) interval (ISO, whole hours) that covers every landed event.
    """
    from tandem.data.landing import write_items, write_landing_events, write_users
    from tandem.data.movielens import MovieLensUnavailable, ensure_movielens, load_movielens

    t0 = time.monotonic()
    try:  # a fresh machine without ../shared: fetch the release there (needs the internet)
        folder = ensure_movielens(Path(folder).name, Path(folder).parent)
    except MovieLensUnavailable as err:
        raise SystemExit(str(err)) from None  # the message says what to do; no traceback
    data = load_movielens(folder)
    write_landing_events(data.events, paths.landing_events, name=f"movielens-{data.name}")
    write_items(data.items, paths)
    write_users(data.users, paths)
    ts = data.events["ts"].to_numpy()
    hour = 3_600_000
    start, end = int(ts.min()) // hour * hour, (int(ts.max()) // hour + 1) * hour
    console.print(f"[bold cyan]>[/] landed {len(data.events):,} events, {len(data.items):,} items, "
                  f"{len(data.users):,} users from {folder} in {time.monotonic() - t0:.1f}s")
    return iso(start), iso(end)
