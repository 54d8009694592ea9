"""Online stores serving reads per request: the user's rows, never per candidate.

``FeastStore`` reads the Feast online store (SQLite or Redis), ``MemoryStore`` holds rows in
dicts (tests, the benchmark's fast path), ``NoStore`` knows nobody. The engine guards every
read with a deadline and a circuit breaker (``serving.engine``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tandem.features import entity as F


@dataclass(frozen=True)
class UserRows:
    """Raw feature rows of one user (``tandem.features.entity`` field names); None = not stored."""

    user: Mapping[str, Any] | None = None
    session: Mapping[str, Any] | None = None
    feed: Any = None  # the user's precomputed feed (serving.precomputed.WithFeeds), if stored


class OnlineStore(Protocol):
    """Per-request user/session lookup; may raise or be slow (the engine guards it)."""

    def fetch(self, user_id: str) -> UserRows: ...


class NoStore:
    """No online store: every user reads as unknown (features take their defaults)."""

    def fetch(self, user_id: str) -> UserRows:
        return UserRows()


class FeastStore:
    """The Feast online store: the user's profile, activity and session rows
    (``tandem.features.feature_store.USER_REFS``, one online read per view); never per candidate."""

    def __init__(self, feature_store, socket_timeout_s: float | None = None):
        from tandem.features.online import bound_read_timeout, user_row_reader

        if socket_timeout_s is not None:  # a hung store frees the reading thread
            bound_read_timeout(feature_store, socket_timeout_s)
        self.reader = user_row_reader(feature_store)
        self.session_fields = {f.name for f in F.SESSION_FIELDS}

    def fetch(self, user_id: str) -> UserRows:
        values = {k: v for k, v in self.reader.read(user_id).items() if v is not None}
        user = {k: v for k, v in values.items() if k not in self.session_fields}
        session = {k: v for k, v in values.items() if k in self.session_fields}
        return UserRows(user or None, session or None)


class MemoryStore:
    """Rows held in dicts (tests, the benchmark's fast path): ``{user_id: row}``."""

    def __init__(self, users: Mapping[str, Mapping[str, Any]],
                 sessions: Mapping[str, Mapping[str, Any]] | None = None):
        self.users, self.sessions = users, sessions or {}

    def fetch(self, user_id: str) -> UserRows:
        return UserRows(self.users.get(user_id), self.sessions.get(user_id))

