"""Drop replayed events from the stream by ``event_id``, in bounded memory.

Producers retry (at-least-once), so the same event can arrive twice; the lake deduplicates by
``event_id`` (``jobs.ingest_events``), and the online session features must agree with it or a
retried click counts twice online and once offline (training-serving skew). A duplicate arrives
close behind its original, so an id is remembered for ``window_ms`` of *event time* behind the
newest event of the partition (the session gap by default: past it the session the event would
count in is over). Event time, not wall-clock time, so a replay after a crash drops exactly what
the uninterrupted run dropped. Memory: one entry per event of the last window per partition
(about 50 MB per million events in the window).
"""

from __future__ import annotations

from tandem import schema as s


class RecentEventIds:
    """``event_id -> ts`` of one partition's events within ``window_ms`` of the newest one."""

    def __init__(self, window_ms: int = s.SESSION_GAP_MS,
                 ids: dict[str, int] | None = None) -> None:
        self.window_ms = window_ms
        self.ids = ids or {}
        self.newest = max(self.ids.values(), default=0)

    def is_duplicate(self, event_id: str, ts: int) -> bool:
        """True if ``event_id`` was seen within the window; else remember it."""
        if event_id in self.ids:
            return True
        self.ids[event_id] = ts
        self.newest = max(self.newest, ts)
        return False

    def prune(self) -> None:
        """Forget the ids older than the window (call now and then, e.g. at each snapshot)."""
        horizon = self.newest - self.window_ms
        self.ids = {e: ts for e, ts in self.ids.items() if ts >= horizon}
