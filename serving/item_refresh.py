"""Item features follow each materialization without a restart.

The engine reads item popularity and CTR from an in-memory table (``serving.item_table``)
loaded when the bundle loads. The hourly feature job materializes new rows into the online
store; without this module they reached serving only with the next model version.
:class:`MaterializationWatcher` wraps the item-table factory, keeps the tables it built (weakly:
a swapped-out engine's table goes with it), and a background thread polls the online store's
materialization watermark every ``interval_s``: when it advances, every live table re-reads its
rows (``refresh()`` replaces its arrays in one assignment, so a request sees the old table or
the new one, never a mix). The poll and the reload run off the request path; a failing poll is
logged and retried at the next tick, the old rows keep serving.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

import numpy as np

from serving.item_table import ItemTable, ItemTableFactory

log = logging.getLogger(__name__)

Watermark = Callable[[], float | None]  # latest materialized time (epoch s), None: never


class Refreshable(ItemTable, Protocol):
    def refresh(self) -> None: ...


class MaterializationWatcher:
    """Refresh the item tables built through :meth:`track` after each materialization.

    Parameters
    ----------
    watermark : the online store's materialization watermark
        (``tandem.features.feature_store.materialization_watermark`` bound to the store)
    interval_s : poll period (the hourly materialization needs no finer one)
    """

    def __init__(self, watermark: Watermark, interval_s: float = 60.0) -> None:
        self.watermark = watermark
        self.interval_s = interval_s
        self.refreshes = 0
        self._tables: weakref.WeakSet[Refreshable] = weakref.WeakSet()
        self._seen = float("inf")  # the oldest watermark a live table was loaded at
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, factory: Callable[[np.ndarray], Refreshable]) -> ItemTableFactory:
        """``factory`` whose tables this watcher refreshes; the current watermark is the one
        they were loaded at."""
        def build(item_ids: np.ndarray) -> ItemTable:
            mark = self.watermark()
            table = factory(item_ids)
            self._tables.add(table)
            self._seen = min(self._seen, -float("inf") if mark is None else mark)
            return table

        return build

    def poll_once(self) -> int:
        """Refresh every live table if the watermark moved since the last look; how many."""
        mark = self.watermark()
        if mark is None or mark <= self._seen:
            return 0
        tables = list(self._tables)
        for table in tables:
            table.refresh()
        self._seen = mark
        self.refreshes += 1
        log.info("materialization watermark %s: refreshed %d item tables", mark, len(tables))
        return len(tables)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # the store is down or mid-write: keep the old rows, retry later
                log.warning("item table refresh failed; serving the previous rows",
                            exc_info=True)

    def start(self) -> MaterializationWatcher:
        self._thread = threading.Thread(target=self._loop, name="item-refresh", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5.0)
