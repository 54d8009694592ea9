"""What one answered request carries, the per-stage timer that fills ``stages_ms``, the
reason shown for each item and the request id."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from tandem.data.impressions import FeatureSample
from tandem.policy.retrieval import source_names


@dataclass
class Result:
    """One answered request (engine side; the servicer turns it into a reply)."""

    request_id: str
    model_version: str
    item_ids: list[str]
    scores: np.ndarray
    source_masks: np.ndarray
    propensities: np.ndarray
    explanations: list[str]
    cold_start: bool = False
    fallbacks: list[str] = field(default_factory=list)
    experiment: str = ""
    variant: str = ""
    stages_ms: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, int] = field(default_factory=dict)  # ranked pool, per source
    pool_size: int = 0  # deduplicated candidates ranked
    logged: FeatureSample | None = None  # sampled ranker rows (``tandem.features.feature_log``)
    path: str = "computed"  # which path answered: precomputed | cached | computed


class StageClock:
    """Per-request stage timer: sums the time per stage into ``stages``."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            ms = (time.perf_counter() - start) * 1000.0
            self.stages[name] = self.stages.get(name, 0.0) + ms

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0


EXPLAIN = {
    "two_tower": "matches your taste profile", "als": "liked by people with similar history",
    "session": "related to what you just watched", "fresh": "new on the catalog",
    "popularity": "popular right now", "content": "in a genre you picked",
    "similar": "similar item", "sequence": "what people watch next after your recent items",
}


def explain(mask: int, explored: bool = False) -> str:
    """Short reason from the sources (first source leads, others are mentioned)."""
    names = source_names(mask)
    if not names:
        return ""
    text = EXPLAIN[names[0]]
    if len(names) > 1:
        text += " (also: " + ", ".join(names[1:]) + ")"
    return text + ("; exploring" if explored else "")


def new_request_id() -> str:
    return uuid.uuid4().hex
