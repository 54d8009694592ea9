"""The session-state fold the feature consumer applies (no broker needed)."""

from __future__ import annotations

from tandem import schema as s
from tandem.streaming.session_state import replay, session_row

GENRES = {"a": ["Drama"], "b": ["Comedy", "Drama"], "c": ["War"]}


def ev(i: int, etype: str, item: str, ts: int, user: str = "u1") -> dict:
    return {s.EVENT_ID: f"e{i}", s.EVENT_TYPE: etype, s.USER_ID: user, s.ITEM_ID: item,
            s.TS: ts}


def test_fold_counts_recent_items_genres_and_session_gap():
    gap = s.SESSION_GAP_MS
    events = [ev(0, s.IMPRESSION, "c", 1000), ev(1, s.CLICK, "a", 2000),
              ev(2, s.PLAY, "b", 3000), ev(3, s.CLICK, "a", 3000),  # same ms: still a new version
              ev(4, s.DISLIKE, "c", 4000), ev(5, s.IMPRESSION, "a", 5000, user="u2"),
              ev(6, s.LIKE, "c", 4000 + gap + 1)]  # more than the gap later: a new session
    states = replay(events, GENRES)
    row = session_row("u1", states["u1"])
    assert row[s.SESSION_RECENT_ITEMS] == ["c", "a", "b"]  # engagements only, distinct, newest 1st
    assert row[s.SESSION_RECENT_GENRES] == ["War", "Drama", "Comedy"]
    assert row[s.SESSION_LENGTH] == 1 and row[s.SESSION_START_TS] == 4000 + gap + 1
    assert row[s.SESSION_LAST_TS] == 4000 + gap + 1
    assert {k: v for k, v in row.items() if k.startswith(s.SESSION_COUNT_PREFIX) and v} == {
        "cnt_like": 1}
    before_gap = replay(events[:5], GENRES)["u1"]
    assert (before_gap.length, before_gap.counts) == (5, {s.IMPRESSION: 1, s.CLICK: 2, s.PLAY: 1,
                                                          s.DISLIKE: 1})
    assert before_gap.version_us == 4_000_000  # strictly increasing: 3_000_000, 3_000_001, ...
    assert replay(events[:4], GENRES)["u1"].version_us == 3_000_001
    u2 = session_row("u2", states["u2"])
    assert (u2[s.SESSION_RECENT_ITEMS], u2["cnt_impression"], u2[s.SESSION_LENGTH]) == ([], 1, 1)


def test_the_demo_burst_reaches_the_session_as_24_events():
    """``make demo``'s burst: a click and a like per item, each its own event, so the feature
    consumer's dedup (by event id) keeps both and the session weighs the likes too."""
    from tandem.cli.demo import burst_events
    from tandem.models.als import session_confidence
    from tandem.streaming.dedup import RecentEventIds

    items = [f"h{i}" for i in range(12)]
    events = burst_events("42", items, 10_000_000, "demo-x")
    seen = RecentEventIds()
    assert not any(seen.is_duplicate(e[s.EVENT_ID], e[s.TS]) for e in events)
    row = session_row("42", replay(events, {i: ["Horror"] for i in items})["42"])
    assert (row["cnt_click"], row["cnt_like"], row[s.SESSION_LENGTH]) == (12, 12, 24)
    assert row[s.SESSION_RECENT_ITEMS] == items[::-1]
    assert session_confidence(row, len(items)) == 4.0  # a click and a like per item
