"""Per-user session state: a deterministic fold over one user's events, in partition order.

The real-time feature consumer applies :func:`apply_event` to each event and pushes
:func:`session_row` rows to Feast (``tandem.schema.SESSION_PUSH_SOURCE``); tests fold the same
events with :func:`replay` to get the state the consumer must converge to.

Rules (the columns are ``tandem.schema.SESSION_FIELDS``):

- A session ends after ``SESSION_GAP_MS`` without events; the next event starts a new one and
  resets ``session_length``, ``session_start_ts`` and the ``cnt_<event_type>`` counts.
- ``recent_item_ids``: the last 20 distinct items the user *engaged* with (every type but
  impression and dislike), newest first -- the query history of ``tandem.features.query_history``,
  which training computes with the same rule; kept across sessions, since a returning user's
  last items still say what they like. ``recent_genres``: those items' genres, distinct,
  newest first, at most 5 (an item's genres in catalog order).
- ``version_us``: the pushed row's Feast ``event_timestamp`` in microseconds, strictly increasing
  per user (``max(previous + 1, ts * 1000)``). Feast's Redis store drops a write whose timestamp
  is not newer than the stored one, so two events in the same millisecond must still differ; the
  value depends only on the events, so a replay after a crash pushes the same rows again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tandem import schema as s
from tandem.features.query_history import NOT_ENGAGEMENT, QUERY_LEN

MAX_RECENT_ITEMS = QUERY_LEN  # the rule is tandem.features.query_history's, which training computes
MAX_RECENT_GENRES = 5


@dataclass
class SessionState:
    """One user's state; JSON-able through :meth:`to_json` / :meth:`from_json`."""

    items: list[str] = field(default_factory=list)
    genres: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    length: int = 0
    start_ts: int = 0
    last_ts: int = 0
    version_us: int = 0

    def to_json(self) -> list[Any]:
        return [self.items, self.genres, self.counts, self.length, self.start_ts, self.last_ts,
                self.version_us]

    @classmethod
    def from_json(cls, v: list[Any]) -> SessionState:
        return cls(*v)


def _to_front(values: list[str], new: Iterable[str], cap: int) -> list[str]:
    new = list(dict.fromkeys(new))
    return (new + [v for v in values if v not in new])[:cap]


def apply_event(state: SessionState | None, event: Mapping[str, Any],
                item_genres: Mapping[str, list[str]]) -> SessionState:
    """Fold one event into ``state`` (mutated and returned; a new state when None)."""
    ts = int(event[s.TS])
    if state is None:
        state = SessionState(start_ts=ts, last_ts=ts)
    elif ts - state.last_ts > s.SESSION_GAP_MS:
        state.counts, state.length, state.start_ts = {}, 0, ts
    etype = event[s.EVENT_TYPE]
    state.length += 1
    state.counts[etype] = state.counts.get(etype, 0) + 1
    state.last_ts = max(state.last_ts, ts)
    state.version_us = max(state.version_us + 1, ts * 1000)
    if etype not in NOT_ENGAGEMENT:
        item = event[s.ITEM_ID]
        state.items = _to_front(state.items, [item], MAX_RECENT_ITEMS)
        state.genres = _to_front(state.genres, item_genres.get(item, ()), MAX_RECENT_GENRES)
    return state


def replay(events: Iterable[Mapping[str, Any]],
           item_genres: Mapping[str, list[str]]) -> dict[str, SessionState]:
    """Every user's state after ``events`` (in per-user order): what the consumer converges to."""
    states: dict[str, SessionState] = {}
    for ev in events:
        states[ev[s.USER_ID]] = apply_event(states.get(ev[s.USER_ID]), ev, item_genres)
    return states


def session_row(user_id: str, st: SessionState) -> dict[str, Any]:
    """The row pushed to ``SESSION_PUSH_SOURCE`` (user_id, event_timestamp, SESSION_FIELDS)."""
    row = {
        s.USER_ID: user_id,
        s.EVENT_TIMESTAMP: pd.Timestamp(st.version_us, unit="us", tz="UTC"),
        s.SESSION_RECENT_ITEMS: list(st.items),
        s.SESSION_RECENT_GENRES: list(st.genres),
        s.SESSION_LENGTH: st.length,
        s.SESSION_START_TS: st.start_ts,
        s.SESSION_LAST_TS: st.last_ts,
    }
    row.update({s.SESSION_COUNT_PREFIX + t: st.counts.get(t, 0) for t in s.EVENT_TYPES})
    return row


def session_frame(states: Mapping[str, SessionState]) -> pd.DataFrame:
    """:func:`session_row` for many users as one frame (one Feast push)."""
    return pd.DataFrame([session_row(u, st) for u, st in states.items()])
