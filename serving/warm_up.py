"""Warming a freshly loaded :class:`serving.engine.Engine` before it takes real requests, and
what the warm-up found (:class:`WarmUp`: ``App`` refuses a bundle whose parts fell back).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from serving.breaker import CircuitBreaker
from serving.config import ServingConfig
from serving.stores import OnlineStore
from serving.validation import RecommendQuery

# fallbacks that mean a part of the bundle failed: a warm-up with any of them refuses the bundle
PART_FALLBACKS = frozenset({"user_tower_error", "two_tower_error", "als_error", "ranker_error",
                            "sequence_error"})


@dataclass(frozen=True)
class WarmUp:
    """What :meth:`Engine.warm_up` did: requests answered and their fallbacks by reason."""

    requests: int
    fallbacks: dict[str, int]

    @property
    def part_failures(self) -> dict[str, int]:
        """Fallbacks that blame the bundle (not the online store or a slow machine)."""
        return {k: n for k, n in self.fallbacks.items() if k in PART_FALLBACKS}


class WarmUpCheck:
    """``Engine.warm_up``: made-up requests through the real request path."""

    def warm_up(self, cfg: ServingConfig, store: OnlineStore, n_requests: int = 64,
                budget_s: float = 5.0, breaker: CircuitBreaker | None = None) -> WarmUp:
        """Answer ``n_requests`` made-up requests before this engine takes real ones.

        A fresh process answers its first requests slowly (1M-item bench bundle: the first
        five took 23-196 ms against ~5 ms warm, two of them past the online store's deadline,
        so degraded): lazily built library state, the store's connection per pool thread,
        memoised encodings. A second server process that took traffic cold gave p99 238 ms
        over a 40 s run at 100 QPS, every slow request in its first 4 s. The warm-up runs
        known users (evenly spread over the ALS users), users known only by their session, a
        cold user and similar items, through the same code as real requests; nothing is
        recorded (metrics are recorded by ``App``). It stops after ``budget_s`` so a slow store
        cannot hold up a start or a reload. Returns how many requests it answered and the
        fallbacks they took (``App`` refuses a bundle whose parts fell back).
        """
        end = time.perf_counter() + budget_s
        devices = ("web", "ios", "android", "tv")
        users = self.user_index[np.linspace(0, len(self.user_index) - 1,
                                            min(n_requests, len(self.user_index))).astype(int)]
        session = tuple(self.item_ids[self.popular[:3]])
        queries = [RecommendQuery("__warm_up_session__", 20, "web", session_item_ids=session),
                   RecommendQuery("__warm_up_cold__", 20, "tv"),
                   *(RecommendQuery(str(u), 20, devices[i % 4]) for i, u in enumerate(users))]
        done, fallbacks = 0, Counter()
        for q in queries[:n_requests]:
            if time.perf_counter() > end:
                break
            fallbacks.update(self.recommend(q, cfg, store, breaker).fallbacks)
            done += 1
        self.similar(str(self.item_ids[self.popular[0]]), 10)
        return WarmUp(done, dict(fallbacks))
