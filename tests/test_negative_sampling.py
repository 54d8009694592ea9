"""jobs.negative_sampling: exact counts, exclusions, popularity skew, seeded re-runs."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import timedelta

import pytest

from tandem import schema as s
from tests.lake_fixtures import DAY, HOUR_MS, MIN, T0, ev, write_lake_events

pytestmark = pytest.mark.spark
NEXT = DAY + timedelta(days=1)
T9 = T0 + 9 * HOUR_MS
PREV = T0 - 12 * HOUR_MS

EVENTS = [
    # yesterday: "hot" is popular, i1..i8 each engaged once (popularity only)
    *[ev(f"b{k}", s.CLICK, f"b{k}", "hot", PREV + k * MIN) for k in range(40)],
    *[ev(f"bg{k}", s.CLICK, "bg", f"i{k}", PREV + k * MIN) for k in range(1, 9)],
    # today: u0 is shown hot, i1, i7 and clicks hot and i1
    *[ev(f"imp-{it}", s.IMPRESSION, "u0", it, T9, request_id="r0", position=p)
      for p, it in enumerate(["hot", "i1", "i7"])],
    ev("c-hot", s.CLICK, "u0", "hot", T9 + MIN, request_id="r0"),
    ev("c-i1", s.CLICK, "u0", "i1", T9 + 2 * MIN, request_id="r0"),
    ev("c-i2", s.CLICK, "u1", "i2", T9), ev("c-i3", s.LIKE, "u1", "i3", T9 + MIN),
    ev("c-i4", s.CLICK, "u2", "i4", T9), ev("c-i5", s.SHARE, "u3", "i5", T9),
    ev("c-i6", s.CLICK, "u4", "i6", T9),
    ev("p-i7", s.PLAY, "u4", "i7", T9 + MIN, dwell_ms=5_000),  # too short: not a positive
]
POSITIVES = {"u0": {"hot", "i1"}, "u1": {"i2", "i3"}, "u2": {"i4"}, "u3": {"i5"}, "u4": {"i6"}}


def _read(spark, root):
    from tandem.spark.tables import negatives_schema

    return spark.read.schema(negatives_schema()).parquet(str(root)).collect()


def _run(spark, paths, labels: bool = True, **change):
    from jobs.build_labels import run as build_labels
    from jobs.negative_sampling import NegativesConfig, run

    if labels:
        build_labels(spark, paths, DAY, NEXT)
    return run(spark, paths, DAY, NEXT, replace(NegativesConfig(ratio=3), **change))


def test_counts_exclusions_and_popularity(spark, paths):
    write_lake_events(spark, paths, EVENTS)
    assert _run(spark, paths) == {"positives": 7, "retrieval": 21, "ranking_impressed": 1,
                                  "ranking_rated": 0, "ranking_sampled": 6,
                                  "lookback_days_computed": 28}  # the first night: all of it
    retrieval = _read(spark, paths.retrieval_negatives)
    assert all(r.item_id not in POSITIVES[r.user_id] for r in retrieval)
    per_positive = Counter(r.event_id for r in retrieval)
    assert set(per_positive.values()) == {3}
    assert len({(r.event_id, r.item_id) for r in retrieval}) == 21
    assert {r.k for r in retrieval} == {0, 1, 2}
    assert {r.date for r in retrieval} == {"2024-01-01"}
    assert Counter(r.item_id for r in retrieval).most_common(1)[0][0] == "hot"
    c_i2 = [r for r in retrieval if r.event_id == "c-i2"]
    assert {(r.pos_item_id, r.ts, r.source) for r in c_i2} == {("i2", T9, "sampled")}

    ranking = _read(spark, paths.ranking_negatives)
    shown = [(r.event_id, r.item_id, r.source, r.k) for r in ranking if r.source != "sampled"]
    assert shown == [("imp-i7", "i7", "impressed", None)]
    sampled = [r for r in ranking if r.source == "sampled"]
    assert Counter(r.event_id for r in sampled) == {"imp-hot": 3, "imp-i1": 3}
    assert all(r.item_id not in POSITIVES["u0"] for r in sampled)


def test_rerun_is_identical_and_seed_matters(spark, paths):
    write_lake_events(spark, paths, EVENTS)
    first = _run(spark, paths)
    rows = sorted(map(tuple, _read(spark, paths.retrieval_negatives)))
    ranking = sorted(map(tuple, _read(spark, paths.ranking_negatives)))
    again = {**first, "lookback_days_computed": 0}  # the lookback's aggregates are written
    assert _run(spark, paths, labels=False) == again
    assert sorted(map(tuple, _read(spark, paths.retrieval_negatives))) == rows
    assert sorted(map(tuple, _read(spark, paths.ranking_negatives))) == ranking
    assert _run(spark, paths, labels=False, seed=18) == again
    assert sorted(map(tuple, _read(spark, paths.retrieval_negatives))) != rows


def test_the_lookback_comes_from_daily_aggregates_not_events(spark, paths):
    """Yesterday's popularity and positives are read from its aggregates once written: with its
    events gone from the lake, the next run samples exactly the same negatives."""
    import shutil

    from tandem.spark.tables import (
        item_day_root,
        item_day_schema,
        positives_day_root,
        positives_day_schema,
    )

    write_lake_events(spark, paths, [*EVENTS, ev("old", s.CLICK, "u1", "hot", PREV)])
    _run(spark, paths)
    rows = sorted(map(tuple, _read(spark, paths.retrieval_negatives)))
    items = spark.read.schema(item_day_schema()).parquet(str(item_day_root(paths)))
    yesterday = {r.item_id: r["count"] for r in items.where("date = '2023-12-31'").collect()}
    assert yesterday == {"hot": 41, **{f"i{k}": 1 for k in range(1, 9)}}
    today = {r.item_id: r["count"] for r in items.where("date = '2024-01-01'").collect()}
    assert today == {"hot": 1, "i1": 1, "i2": 1, "i3": 1, "i4": 1, "i5": 1, "i6": 1, "i7": 1}
    pairs = spark.read.schema(positives_day_schema()).parquet(str(positives_day_root(paths)))
    assert ("u1", "hot") in {(r.user_id, r.item_id)
                             for r in pairs.where("date = '2023-12-31'").collect()}

    shutil.rmtree(paths.events / "date=2023-12-31")
    assert _run(spark, paths, labels=False)["lookback_days_computed"] == 0
    assert sorted(map(tuple, _read(spark, paths.retrieval_negatives))) == rows
    # u1 liked "hot" yesterday: still excluded, from the aggregate alone
    assert not [r for r in _read(spark, paths.retrieval_negatives)
                if r.user_id == "u1" and r.item_id == "hot"]


def test_a_driver_side_step_over_budget_names_the_setting(spark, paths, monkeypatch):
    from tandem.spark.driver import DriverBudgetError

    write_lake_events(spark, paths, EVENTS)
    monkeypatch.setenv("TANDEM_DRIVER_MAX_ROWS", "5")  # popularity: hot and i1..i8
    with pytest.raises(DriverBudgetError, match="9 rows .* TANDEM_DRIVER_MAX_ROWS"):
        _run(spark, paths, labels=False)
    assert not paths.retrieval_negatives.exists()


def test_smoothed_cdf_follows_alpha():
    import numpy as np
    import pandas as pd

    from tandem.spark.sampling import smoothed_cdf

    counts = pd.DataFrame({s.ITEM_ID: ["b", "a", "z"], "count": [16, 1, 0]})
    items, cdf = smoothed_cdf(counts, alpha=0.75)
    assert list(items) == ["a", "b"]  # sorted, unseen items dropped
    np.testing.assert_allclose(cdf, [1 / 9, 1.0])  # 1 : 16**0.75 = 1 : 8
    _, uniform = smoothed_cdf(counts, alpha=0.0)
    np.testing.assert_allclose(uniform, [0.5, 1.0])


def test_cdf_cells_lookup_is_exact_inverse_cdf():
    """Joining a draw on its cell and keeping lo <= u < hi equals np.searchsorted."""
    import numpy as np
    import pandas as pd

    from tandem.spark.sampling import cdf_cells

    rng = np.random.default_rng(0)
    items = np.array([f"i{k:03d}" for k in range(300)], dtype=object)
    weights = rng.pareto(1.0, size=300) + 1e-3
    cdf = np.cumsum(weights) / weights.sum()
    cells = 1024
    table = cdf_cells(items, cdf, cells)
    u = np.r_[rng.random(20_000), 0.0, np.nextafter(1.0, 0.0), cdf[:-1]]
    draws = pd.DataFrame({"_u": u, "_cell": np.floor(u * cells).astype(np.int64)})
    got = draws.reset_index().merge(table, on="_cell")
    got = got[(got["_u"] >= got["_lo"]) & (got["_u"] < got["_hi"])].sort_values("index")
    assert len(got) == len(u)  # exactly one item per draw
    want = items[np.minimum(np.searchsorted(cdf, u, side="right"), len(items) - 1)]
    assert list(got[s.ITEM_ID]) == list(want)
