"""jobs.build_labels: attribution by request within the window, ratings mode, idempotent."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tandem import schema as s
from tests.lake_fixtures import DAY, HOUR_MS, MIN, T0, ev, write_lake_events

pytestmark = pytest.mark.spark
NEXT = DAY + timedelta(days=1)
T10, T2350 = T0 + 10 * HOUR_MS, T0 + 23 * HOUR_MS + 50 * MIN


def imp(i: str, user: str, item: str, ts: int, request: str, position: int) -> dict:
    return ev(i, s.IMPRESSION, user, item, ts, request_id=request, position=position,
              ctx_device="tv", experiment="exp", variant="B", propensity=0.5)


def eng(i: str, etype: str, user: str, item: str, ts: int, request: str, **more) -> dict:
    return ev(i, etype, user, item, ts, request_id=request, **more)


EVENTS = [
    # request r1 (u1, 10:00) shows i1..i4
    *[imp(f"imp1-{k}", "u1", f"i{k}", T10, "r1", k) for k in range(1, 5)],
    eng("c1", s.CLICK, "u1", "i1", T10 + MIN, "r1"),
    eng("p2", s.PLAY, "u1", "i2", T10 + 2 * MIN, "r1", dwell_ms=45_000),
    eng("p3", s.PLAY, "u1", "i3", T10 + 3 * MIN, "r1", dwell_ms=10_000),  # too short
    # request r2 (u2, 23:50) shows i1, i5; the like lands the next day, within 30 min
    imp("imp2-1", "u2", "i1", T2350, "r2", 0), imp("imp2-5", "u2", "i5", T2350, "r2", 1),
    eng("l1", s.LIKE, "u2", "i1", T2350 + 20 * MIN, "r2"),
    eng("c5", s.CLICK, "u2", "i5", T2350 + 40 * MIN, "r2"),  # outside the window
    # request r3 (u1, 12:00) shows i6; the click belongs to another request
    imp("imp3-6", "u1", "i6", T0 + 12 * HOUR_MS, "r3", 0),
    eng("c6", s.CLICK, "u1", "i6", T0 + 12 * HOUR_MS + MIN, "r99"),
    # an impression of the next day is not labelled now
    imp("imp4-1", "u3", "i1", T0 + 24 * HOUR_MS + 5 * MIN, "r4", 0),
]
EXPECTED = {  # impression -> (clicked, played, liked, dwell_ms, label)
    "imp1-1": (1, 0, 0, 0, 1), "imp1-2": (0, 1, 0, 45_000, 1), "imp1-3": (0, 1, 0, 10_000, 0),
    "imp1-4": (0, 0, 0, 0, 0), "imp2-1": (0, 0, 1, 0, 1), "imp2-5": (0, 0, 0, 0, 0),
    "imp3-6": (0, 0, 0, 0, 0),
}


def _labels(spark, paths):
    from tandem.spark.tables import ranking_labels_schema

    return spark.read.schema(ranking_labels_schema()).parquet(str(paths.ranking_labels))


def test_impressions_labelled_with_attributed_engagements(spark, paths):
    from jobs.build_labels import run

    write_lake_events(spark, paths, EVENTS)
    assert run(spark, paths, DAY, NEXT) == {"mode": "impressions", "rows": 7, "positives": 3}
    rows = {r.event_id: r for r in _labels(spark, paths).collect()}
    assert {k: (r.clicked, r.played, r.liked, r.dwell_ms, r.label) for k, r in rows.items()} \
        == EXPECTED
    r = rows["imp2-1"]
    assert (r.ts, r.date, r.request_id, r.position, r.ctx_device, r.propensity) == (
        T2350, "2024-01-01", "r2", 0, "tv", 0.5)
    stamps = _labels(spark, paths).selectExpr("unix_millis(event_timestamp) = ts AS ok")
    assert all(r.ok for r in stamps.collect())


def test_rerun_is_identical(spark, paths):
    from jobs.build_labels import run

    write_lake_events(spark, paths, EVENTS)
    first = run(spark, paths, DAY, NEXT)
    rows = sorted(map(tuple, _labels(spark, paths).collect()))
    assert run(spark, paths, DAY, NEXT) == first
    assert sorted(map(tuple, _labels(spark, paths).collect())) == rows


def test_ratings_mode_without_impressions(spark, paths):
    from jobs.build_labels import LabelsConfig, run

    values = [5.0, 4.0, 3.0, 1.0, 4.5]
    write_lake_events(spark, paths, [
        *[ev(f"m{k}", s.RATING, f"u{k}", f"i{k}", T0 + k * HOUR_MS, value=v)
          for k, v in enumerate(values)],
        ev("late", s.RATING, "u9", "i9", T0 + 25 * HOUR_MS, value=5.0),
    ])
    assert run(spark, paths, DAY, NEXT) == {"mode": "ratings", "rows": 5, "positives": 3}
    got = {r.event_id: (r.value, r.label, r.clicked) for r in _labels(spark, paths).collect()}
    assert got == {f"m{k}": (v, int(v >= s.POSITIVE_RATING), 0) for k, v in enumerate(values)}
    # an hourly run (tandem_hourly) recomputes the whole day it falls in: same partition, same rows
    assert run(spark, paths, DAY + timedelta(hours=3), DAY + timedelta(hours=4),
               LabelsConfig()) == {"mode": "ratings", "rows": 5, "positives": 3}
    assert _labels(spark, paths).count() == 5
