"""Bounded caches for work that repeats across requests, with hit/miss metrics.

Two answers are the same for many requests: the cold-start candidate pool (it depends on the
onboarding genres and the minute, not on who asks: country, device and surface do not change
it today) and ``SimilarItems`` of an item. Each :class:`~serving.engine.Engine` owns its
caches, so a model swap starts with empty ones (the old engine and its caches are freed with
it): nothing cached from one model version is served by the next. Lookups count in
``tandem_cache_lookups_total{cache, outcome}``.

What stays per request is what must: the exclusion of seen/excluded items and the exploration
draw of the cold path are applied to the cached pool on every request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cachetools import LRUCache

from serving import metrics as m

V = TypeVar("V")
COLD_CACHE_ENTRIES = 1024  # genre combinations x fresh-set sizes; a few KB each
SIMILAR_CACHE_ENTRIES = 20_000  # (item, k) answers; at most ~1.6 KB each (k = 100)


class BoundedCache(Generic[V]):
    """A thread-safe LRU of at most ``maxsize`` entries named ``name`` in the metrics.

    ``get(key, compute)`` returns the cached value or stores ``compute()``; two threads missing
    the same key together may both compute it (the values are equal; no lock is held while
    computing). Values must be treated as read-only by callers.
    """

    def __init__(self, name: str, maxsize: int):
        self._lru: LRUCache = LRUCache(maxsize=maxsize)
        self._lock = threading.Lock()
        self._hit = m.CACHE_LOOKUPS.labels(name, "hit")
        self._miss = m.CACHE_LOOKUPS.labels(name, "miss")

    def get(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, bool]:
        """(value, hit)."""
        with self._lock:
            value = self._lru.get(key)
        if value is not None:
            self._hit.inc()
            return value, True
        self._miss.inc()
        value = compute()
        with self._lock:
            self._lru[key] = value
        return value, False

    def __len__(self) -> int:
        return len(self._lru)
