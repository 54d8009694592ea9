"""Request checks: every bad input becomes one ``InvalidRequest`` with a readable message.

The servicer turns ``InvalidRequest`` into ``INVALID_ARGUMENT``; nothing past these checks may
assume more than they guarantee (ids 1..64 characters, bounded list sizes, k in range, a
well-formed context). Limits follow the JSON Schemas in ``schemas/`` (ids, context fields).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ID_LEN = 64  # schemas/event.v1: user_id / item_id maxLength
MAX_EXCLUDE = 1000
MAX_SESSION = 100
MAX_GENRES = 20
MAX_CONTEXT_FIELD = 32  # schemas/event.v1: context.device / surface maxLength
MAX_TS_MS = 32_503_680_000_000  # schemas/event.v1: ts maximum (year 3000)
_COUNTRY = re.compile(r"[A-Z]{2}")


class InvalidRequest(ValueError):
    """A request that can never be answered as sent (maps to INVALID_ARGUMENT)."""


def check_id(value: str, field: str) -> None:
    if not value:
        raise InvalidRequest(f"{field} is empty")
    if len(value) > MAX_ID_LEN:
        raise InvalidRequest(f"{field} is longer than {MAX_ID_LEN} characters")
    if not value.isprintable():
        raise InvalidRequest(f"{field} has non-printable characters")


def check_ids(values: Sequence[str], field: str, max_len: int) -> None:
    if len(values) > max_len:
        raise InvalidRequest(f"{field} has {len(values)} entries (at most {max_len})")
    for i, value in enumerate(values):
        check_id(value, f"{field}[{i}]")


def check_k(k: int, max_k: int) -> None:
    if k <= 0 or k > max_k:
        raise InvalidRequest(f"k must be in 1..{max_k}, got {k}")


def check_context(device: str, country: str, surface: str, ts: int,
                  genres: Sequence[str]) -> None:
    """Context fields: short printable strings, ISO-3166 alpha-2 country, ts in range."""
    for name, value in (("context.device", device), ("context.surface", surface)):
        if len(value) > MAX_CONTEXT_FIELD or not value.isprintable():
            raise InvalidRequest(f"{name} must be at most {MAX_CONTEXT_FIELD} printable "
                                 "characters")
    if country and not _COUNTRY.fullmatch(country):
        raise InvalidRequest(f"context.country must be two upper-case letters, got {country!r}")
    if ts < 0 or ts > MAX_TS_MS:
        raise InvalidRequest(f"context.ts must be epoch milliseconds in 0..{MAX_TS_MS}")
    check_ids(genres, "context.onboarding_genres", MAX_GENRES)


@dataclass(frozen=True)
class RecommendQuery:
    """A validated Recommend request (plain Python; ``ts`` 0 means "use the server clock")."""

    user_id: str
    k: int
    device: str = ""
    country: str = ""
    surface: str = ""
    ts: int = 0
    onboarding_genres: tuple[str, ...] = ()
    exclude_item_ids: tuple[str, ...] = ()
    session_item_ids: tuple[str, ...] = ()


def parse_recommend(request, max_k: int) -> RecommendQuery:
    """Check a ``RecommendRequest`` message and copy it into a :class:`RecommendQuery`."""
    check_id(request.user_id, "user_id")
    check_k(request.k, max_k)
    ctx = request.context
    check_context(ctx.device, ctx.country, ctx.surface, ctx.ts, ctx.onboarding_genres)
    check_ids(request.exclude_item_ids, "exclude_item_ids", MAX_EXCLUDE)
    check_ids(request.session_item_ids, "session_item_ids", MAX_SESSION)
    return RecommendQuery(request.user_id, request.k, ctx.device, ctx.country, ctx.surface,
                          ctx.ts, tuple(ctx.onboarding_genres), tuple(request.exclude_item_ids),
                          tuple(request.session_item_ids))


def parse_similar(request, max_k: int) -> tuple[str, int]:
    """Check a ``SimilarItemsRequest``; returns ``(item_id, k)``."""
    check_id(request.item_id, "item_id")
    check_k(request.k, max_k)
    return request.item_id, request.k
