"""The impression-logging hook: serving hands every answered feed to an ``ImpressionSink``.

Serving knows nothing about Kafka: the streaming package implements a sink that turns a
``Feed`` into ``impression`` events (schemas/event.v1) and produces them. The default sink
drops everything, so serving runs without a broker. A sink must not block the request path
(queue and return) and must not raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class FeatureSample:
    """A sampled share of one request's ranked candidates as the ranker saw them: row ``j`` of
    ``values`` is ``item_ids[j]``'s input, columns in ``names`` order; ``ts`` is the time the
    features were computed at (epoch ms), ``device`` the request's
    (``tandem.features.feature_log``)."""

    item_ids: Sequence[str]
    names: Sequence[str]
    values: np.ndarray  # float32 [m, len(names)]
    ts: int
    device: str | None = None


@dataclass(frozen=True)
class Feed:
    """One answered request, as the impression log needs it.

    ``item_ids``, ``propensities`` and positions (list order) are aligned; ``ts`` is epoch ms.
    """

    request_id: str
    user_id: str
    ts: int
    item_ids: Sequence[str]
    propensities: Sequence[float]
    model_version: str
    experiment: str
    variant: str
    device: str | None = None
    country: str | None = None
    surface: str | None = None
    logged: FeatureSample | None = None  # feature vectors to log (``tandem.features.feature_log``)


class ImpressionSink(Protocol):
    """Receives every feed served; implementations queue and return quickly."""

    def log(self, feed: Feed) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Default sink: discards feeds (no broker needed)."""

    def log(self, feed: Feed) -> None:
        return None

    def close(self) -> None:
        return None
