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
