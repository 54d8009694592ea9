"""RecentEventIds: a duplicate within the window is caught, memory stays within the window."""

from __future__ import annotations

from tandem.streaming.dedup import RecentEventIds


def test_duplicates_within_the_window_are_caught_and_old_ids_forgotten():
    recent = RecentEventIds(window_ms=1000)
    assert [recent.is_duplicate(f"e{i}", i * 100) for i in range(30)] == [False] * 30
    assert recent.is_duplicate("e29", 2900) and recent.is_duplicate("e25", 2500)
    recent.prune()
    assert sorted(recent.ids) == sorted(f"e{i}" for i in range(19, 30))  # ts >= 2900 - 1000
    assert not recent.is_duplicate("e2", 200)  # beyond the window: counted again, like a new id
    restored = RecentEventIds(window_ms=1000, ids=dict(recent.ids))  # from a snapshot
    assert restored.newest == 2900 and restored.is_duplicate("e20", 2000)
