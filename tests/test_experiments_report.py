"""jobs/experiment_report on a simulated two-day experiment written to the lake."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from tandem import schema as s
from tandem.data.landing import write_events_parquet, write_items
from tandem.data.world import World
from tandem.data.world_config import ARRIVAL_TS, WorldConfig
from tandem.experiments import definitions as defs
from tandem.experiments.rehearsal import experiment_events

pytestmark = pytest.mark.spark
DAY0 = datetime(2024, 1, 1, tzinfo=UTC)


def build_lake(paths, keep: dict[str, float], days: int = 2, sessions: int = 3000,
               canary: dict | None = None) -> pa.Table:
    """Items + ``days`` days of experiment events in lake/events (engagements kept with
    probability ``keep[variant]``); returns all events."""
    world = World.generate(WorldConfig(n_users=4000, n_items=300, n_events_target=10_000,
                                       late_share=0.0, seed=5))
    d = defs.Definition.from_dict({
        "name": "exp1", "salt": "exp1", "start": DAY0.isoformat(),
        "variants": [{"name": "control"}, {"name": "treatment", "alias": "challenger"}],
        **({"canary": canary} if canary else {})})
    defs.save(defs.definitions_path(paths), [d])
    write_items(world.items_table(), paths)
    tables = []
    for day in range(days):
        t = experiment_events(world, d, day, sessions, keep)
        write_events_parquet(t, paths.events, f"exp-d{day}", by=ARRIVAL_TS)
        tables.append(t)
    return pa.concat_tables(tables)


def hand_ctr(events: pa.Table, end: datetime) -> dict[str, tuple[int, int, int]]:
    """Per variant: (users, impressions, clicks) of impressions before ``end``."""
    frame = events.to_pandas()
    end_ms = int(end.timestamp() * 1000)
    imp = frame[(frame[s.EVENT_TYPE] == s.IMPRESSION) & (frame[s.TS] < end_ms)]
    clk = frame[frame[s.EVENT_TYPE] == s.CLICK][[s.REQUEST_ID, s.ITEM_ID]].drop_duplicates()
    clk["clicked"] = 1
    j = imp.merge(clk, on=[s.REQUEST_ID, s.ITEM_ID], how="left").fillna({"clicked": 0})
    return {v: (g[s.USER_ID].nunique(), len(g), int(g["clicked"].sum()))
            for v, g in j.groupby(s.VARIANT)}


def test_report_matches_hand_counts_detects_a_planted_lift_and_reruns_idempotently(
        spark, paths, tmp_path):
    from jobs.experiment_report import ReportConfig, run

    events = build_lake(paths, {"control": 1 / 1.3})
    cfg = ReportConfig(out_dir=tmp_path / "reports")
    run(spark, paths, DAY0, DAY0 + timedelta(days=1), cfg)
    end = DAY0 + timedelta(days=2)
    counts = run(spark, paths, DAY0 + timedelta(days=1), end, cfg)
    assert counts["experiments"] == 1
    report = json.loads((tmp_path / "reports" / "experiment_exp1.json").read_text())
    hand = hand_ctr(events, end)
    assert report["srm"]["users"] == {v: h[0] for v, h in hand.items()}
    assert report["srm"]["p_value"] > 0.001 and not report["srm"]["mismatch"]
    ctr = report["comparisons"]["treatment"]["ctr"]
    assert ctr["control"] == pytest.approx(hand["control"][2] / hand["control"][1], rel=1e-12)
    assert ctr["treatment"] == pytest.approx(hand["treatment"][2] / hand["treatment"][1],
                                             rel=1e-12)
    assert ctr["relative"] == pytest.approx(0.3, abs=0.12)  # the planted lift
    assert ctr["p_value"] < 0.01 and ctr["ci_low"] > 0
    seq = report["sequential"]["treatment"]
    assert seq["looks"] == 2 and seq["significant"]
    assert {m for m in report["comparisons"]["treatment"]} == {"ctr", "conversion", "dwell_ms",
                                                               "diversity"}
    days = report["daily"]["control"]
    assert [r["date"] for r in days] == ["2024-01-01", "2024-01-02"]
    assert all(0 < r["coverage"] <= 1 and 0 < r["diversity"] <= 1 for r in days)
    assert sum(r["impressions"] for r in days) == hand["control"][1]
    assert "exp1" in (tmp_path / "reports" / "experiment_exp1.html").read_text()
    # re-running the same day replaces its look and partitions: same numbers
    run(spark, paths, DAY0 + timedelta(days=1), end, cfg)
    again = json.loads((tmp_path / "reports" / "experiment_exp1.json").read_text())
    assert again["sequential"]["treatment"]["looks"] == 2
    assert again["comparisons"] == report["comparisons"]


def test_no_experiment_no_work(spark, paths, tmp_path):
    from jobs.experiment_report import ReportConfig, run

    assert run(spark, paths, DAY0, DAY0 + timedelta(days=1),
               ReportConfig(out_dir=tmp_path)) == {"experiments": 0}
    assert not list(tmp_path.iterdir())


def test_weights_follow_the_canary():
    d = defs.Definition.from_dict({"name": "c", "variants": [{"name": "control"},
                                                             {"name": "treatment"}],
                                   "canary": {"variant": "treatment", "step": 0}})
    assert d.weights() == pytest.approx({"treatment": 0.01, "control": 0.99})
    assert np.isclose(sum(replace(d, canary=None).weights().values()), 2.0)


def test_a_rolled_back_canary_is_still_compared_and_srm_tests_the_fixed_split():
    """The canary task may roll the canary back before the day's report runs: the report still
    reads the traffic it had, and the SRM check ignores its moving share."""
    from scipy.stats import chisquare

    from jobs.experiment_report import compare
    from tandem.experiments.stats import Moments

    d = defs.Definition.from_dict({
        "name": "c", "variants": [{"name": "control"}, {"name": "b", "weight": 3.0},
                                  {"name": "treatment"}],
        "canary": {"variant": "treatment", "step": 2, "status": defs.ROLLED_BACK}})
    assert "treatment" not in d.weights()

    def moments(n: int, clicks: float) -> dict:
        return {"ctr": Moments(n, sx=10.0 * n, sy=clicks, sxx=100.0 * n, syy=clicks,
                               sxy=10.0 * clicks),
                "dwell": Moments(n, sy=n, syy=n), "diversity": Moments(n, sy=n, syy=n),
                "converted": n // 10}

    out = compare(d, {"control": moments(1000, 900.0), "b": moments(2900, 2610.0),
                      "treatment": moments(60, 20.0)}, 0.05)
    assert set(out["comparisons"]) == {"b", "treatment"}
    assert out["comparisons"]["treatment"]["ctr"]["relative"] == pytest.approx(
        (20 / 600) / (900 / 10000) - 1)
    srm = out["srm"]
    assert srm["expected_share"] == pytest.approx({"control": 0.25, "b": 0.75})
    assert srm["excluded"] == ["treatment"]
    assert srm["users"] == {"control": 1000, "b": 2900, "treatment": 60}
    ref = chisquare([1000, 2900], [3900 * 0.25, 3900 * 0.75])
    assert srm["chi2"] == pytest.approx(ref.statistic) and srm["p_value"] == pytest.approx(
        ref.pvalue)
