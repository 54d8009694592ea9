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


def _run(spark, paths, start=DAY, end=NEXT, cfg=None):
    """Label the impressions of ``[start, end)``: run over the interval where they close."""
    from jobs.build_labels import LabelsConfig, closing_interval, run

    cfg = cfg or LabelsConfig()
    return run(spark, paths, *closing_interval(start, end, cfg), cfg)


def _labels(spark, paths):
    from tandem.spark.tables import ranking_labels_schema

    return spark.read.schema(ranking_labels_schema()).parquet(str(paths.ranking_labels))


def test_impressions_labelled_with_attributed_engagements(spark, paths):
    write_lake_events(spark, paths, EVENTS)
    assert _run(spark, paths) == {"mode": "impressions", "rows": 7, "positives": 3}
    rows = {r.event_id: r for r in _labels(spark, paths).collect()}
    assert {k: (r.clicked, r.played, r.liked, r.dwell_ms, r.label) for k, r in rows.items()} \
        == EXPECTED
    r = rows["imp2-1"]
    assert (r.ts, r.date, r.hour, r.request_id, r.position, r.ctx_device, r.propensity) == (
        T2350, "2024-01-01", 23, "r2", 0, "tv", 0.5)
    stamps = _labels(spark, paths).selectExpr("unix_millis(event_timestamp) = ts AS ok")
    assert all(r.ok for r in stamps.collect())


def test_rerun_is_identical(spark, paths):
    write_lake_events(spark, paths, EVENTS)
    first = _run(spark, paths)
    rows = sorted(map(tuple, _labels(spark, paths).collect()))
    assert _run(spark, paths) == first
    assert sorted(map(tuple, _labels(spark, paths).collect())) == rows


def test_ratings_mode_without_impressions(spark, paths):
    from jobs.build_labels import run

    values = [5.0, 4.0, 3.0, 1.0, 4.5]
    write_lake_events(spark, paths, [
        *[ev(f"m{k}", s.RATING, f"u{k}", f"i{k}", T0 + k * HOUR_MS, value=v)
          for k, v in enumerate(values)],
        ev("late", s.RATING, "u9", "i9", T0 + 25 * HOUR_MS, value=5.0),
    ])
    assert _run(spark, paths) == {"mode": "ratings", "rows": 5, "positives": 3}
    got = {r.event_id: (r.value, r.label, r.clicked) for r in _labels(spark, paths).collect()}
    assert got == {f"m{k}": (v, int(v >= s.POSITIVE_RATING), 0) for k, v in enumerate(values)}
    # an hourly run (tandem_hourly) at 04:00-05:00 labels the hour whose window closed: 02:00
    assert run(spark, paths, DAY + timedelta(hours=4), DAY + timedelta(hours=5)) == {
        "mode": "ratings", "rows": 1, "positives": 0}
    assert _labels(spark, paths).count() == 5  # that hour replaced, the others kept


def test_hourly_runs_label_each_closed_hour_once_and_equal_one_run(spark, paths, tmp_path):
    """Run by run, two hours late: the same rows as one run over the whole day."""
    from jobs.build_labels import run
    from tandem.config import Paths

    write_lake_events(spark, paths, EVENTS)
    whole = _run(spark, paths)
    hourly = Paths(tmp_path / "hourly")
    write_lake_events(spark, hourly, EVENTS)
    cuts = [2, 10, 14, 15, 26]  # consecutive runs, one of them the single hour 14:00-15:00
    counts = [run(spark, hourly, DAY + timedelta(hours=a), DAY + timedelta(hours=b))
              for a, b in zip(cuts, cuts[1:], strict=False)]
    assert [c["rows"] for c in counts] == [0, 4, 1, 2]  # 10:00 closes at 12:00, 12:00 at 14:00
    assert sum(c["positives"] for c in counts) == whole["positives"]
    assert sorted(map(tuple, _labels(spark, hourly).collect())) == sorted(
        map(tuple, _labels(spark, paths).collect()))
