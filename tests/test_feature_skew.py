"""Serve-time feature logging and the skew gate: PSI, the report, and the whole path on real
components (Feast on SQLite/DuckDB, the tansu broker, the landing consumer, serving's App).
"""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from jobs import feature_skew as FS
from tandem import schema as s
from tandem.data.impressions import Feed
from tandem.features import feature_log as FL
from tandem.features import ranking_features as RF
from tandem.validation import ContractError


def test_psi_is_zero_for_the_same_values_and_large_for_a_shift():
    x = np.random.default_rng(0).normal(size=5000)
    assert FS.psi(x, x) == pytest.approx(0.0, abs=1e-12)
    assert FS.psi(x, x + 0.05) < 0.1  # a small drift passes
    assert FS.psi(x, x + 1.0) > 0.25
    # missing values are their own bin: serving sending NaN where training had values shows
    assert FS.psi(x, np.where(np.arange(5000) % 2 == 0, np.nan, x)) > 0.25
    assert FS.psi(np.zeros(100), np.zeros(100)) == pytest.approx(0.0, abs=1e-12)


def test_psi_sees_a_shift_away_from_a_value_training_holds_for_most_rows():
    """The demo's activity columns: 0 (the default) in every training row, a count in serving.
    Every decile of a constant is that value; served values at or above it shared its bin and
    PSI read 0 while all 34 rows differed."""
    trained = np.zeros(200)
    assert FS.psi(trained, np.full(200, 5.2)) > 0.25  # all above the constant
    assert FS.psi(trained, np.full(200, -1.0)) > 0.25  # all below it
    mostly = np.r_[np.zeros(180), np.arange(1.0, 21.0)]  # 90 % zeros, then a tail
    assert FS.psi(mostly, np.r_[np.zeros(100), np.arange(1.0, 101.0)]) > 0.25
    assert FS.psi(mostly, mostly) == pytest.approx(0.0, abs=1e-12)
    codes = np.repeat([1.0, 2.0, 3.0], 100)  # a categorical code: a bin per value
    assert FS.psi(codes, np.repeat([1.0, 3.0, 2.0], [100, 100, 100])) == pytest.approx(0.0)
    assert FS.psi(codes, np.repeat([1.0, 2.0, 3.0], [200, 50, 50])) > 0.25


def test_report_fails_above_the_threshold_and_skips_with_too_few_rows():
    rng = np.random.default_rng(1)
    trained = pd.DataFrame({"a": rng.normal(size=500), "b": rng.normal(size=500)})
    logged = trained.assign(b=trained["b"] + 2.0)
    cfg = {**FS.CONFIG, "threshold": 0.1, "min_rows": 50}
    report = FS.compare(logged, trained, cfg)
    assert report["features"]["a"] == {"psi": 0.0, "mean_diff": 0.0, "n": 500}
    assert report["features"]["b"]["mean_diff"] == pytest.approx(2.0)
    assert report["max_psi"] == report["features"]["b"]["psi"] > 0.1
    assert report["passed"] is False and report["threshold"] == 0.1
    few = FS.compare(logged.head(10), trained.head(10), cfg)
    assert few["passed"] is True and "skipped" in few


def test_sample_is_seeded_by_the_request_and_records_follow_the_contract():
    items = np.array([f"i{j}" for j in range(1000)], dtype=object)
    rows = np.arange(200, 900)
    x = np.random.default_rng(2).normal(size=(len(rows), 3)).astype(np.float32)
    x[0, 1] = np.nan
    a = FL.sample("req-1", items, rows, x, ("f0", "f1", "f2"), 0.05, 1_700_000_000_000, "tv")
    b = FL.sample("req-1", items, rows, x, ("f0", "f1", "f2"), 0.05, 1_700_000_000_000, "tv")
    assert a is not None and list(a.item_ids) == list(b.item_ids) and 10 < len(a.item_ids) < 70
    drawn = [int(i[1:]) - 200 for i in a.item_ids]
    np.testing.assert_array_equal(a.values, x[drawn])
    assert FL.sample("req-1", items, rows, x, ("f0", "f1", "f2"), 0.0, 0, None) is None
    full = FL.sample("req-2", items, rows, x, ("f0", "f1", "f2"), 1.0, 5, None)
    feed = Feed("req-2", "u1", 9, [], [], "v1", "", "", logged=full)
    records = FL.records(feed)
    assert len(records) == len(rows) and records[0]["features"]["f1"] is None
    assert records[0][s.TS] == 5  # the features' time, not the feed's
    for rec in records[:5]:
        FL.validate_record(rec)
    with pytest.raises(ContractError):
        FL.validate_record({**records[0], "features": {"f0": "high"}})

def _feast_world(paths, tmp_path, t1: pd.Timestamp):
    """An applied Feast repo with the feature rows of ``tests.test_feature_store`` at ``t1 - 1 d``
    and ``t1`` (users u1, u2; items i0..i3: the synthetic bundle's ids), materialized, u1's
    session row at ``t1 + 10 min`` pushed as the feature consumer pushes it (online and to the
    offline copy), and a small synthetic bundle: (store, bundle folder)."""
    from tandem.features import feature_store as fs
    from tandem.models import synthetic_bundle as SB
    from tandem.streaming.feature_consumer import feast_sink
    from tests.test_feature_store import write_features

    t0 = t1 - pd.Timedelta(days=1)
    write_features(paths, t0, t1)
    store = fs.apply(paths)
    fs.materialize(paths, (t0 - timedelta(days=1)).to_pydatetime(), t1.to_pydatetime(), store)
    start_ms = int(t1.value // 1_000_000)
    feast_sink(paths)(fs.session_frame([{
        s.USER_ID: "u1", s.EVENT_TIMESTAMP: t1 + pd.Timedelta(minutes=10), s.SESSION_LENGTH: 3,
        s.SESSION_START_TS: start_ms, s.SESSION_LAST_TS: start_ms + 600_000,
        s.SESSION_RECENT_ITEMS: ["i2"], s.SESSION_RECENT_GENRES: ["Comedy"], "cnt_click": 2}]))
    bundle, _ = SB.build(tmp_path / "synthetic", SB.SyntheticSpec(
        n_items=300, n_users=100, n_als_users=50, n_trees=5, num_leaves=7, n_train_groups=30,
        group_size=20))
    return store, bundle


@pytest.mark.kafka
@pytest.mark.feast
@pytest.mark.serving
def test_a_logged_vector_equals_the_training_row_of_the_same_entity_and_time(
        kafka_broker, paths, tmp_path):
    """Serving ranks with Feast, logs every candidate's row through Kafka; the landing consumer
    lands them; the skew job's training path (point-in-time join, session rows the feature
    consumer's sink wrote offline) rebuilds exactly the same values: PSI 0, no difference."""
    from serving.app import App, FeastStore, ServingConfig
    from serving.server import local_source
    from serving.validation import RecommendQuery
    from tandem.features import online as FO
    from tandem.streaming.producer import EventProducer, ImpressionLogger
    from tests.test_streaming import new_topic, start, stop, wait_for

    # an hour ago: the log lands by arrival hour, and the request is one of this hour
    t1 = pd.Timestamp.now(tz="UTC").floor("h") - pd.Timedelta(hours=1)
    store, bundle = _feast_world(paths, tmp_path, t1)
    now = t1 + pd.Timedelta(minutes=20)
    topic = new_topic(kafka_broker.bootstrap)
    lander = start("tandem.streaming.landing_consumer", paths, kafka_broker.bootstrap, topic,
                   "--kind", "feature_log")
    fetch, probe = local_source(bundle)
    cfg = ServingConfig(ranker_backend="lightgbm", feature_log_share=1.0,
                        online_store_timeout_ms=5000.0, rank_deadline_ms=10_000.0)
    sink = ImpressionLogger(EventProducer(kafka_broker.bootstrap, topic=new_topic(
        kafka_broker.bootstrap)), feature_log_topic=topic)
    app = App(fetch, probe, cfg=cfg, store=FeastStore(store), sink=sink,
              item_features=lambda ids: FO.ItemFeatureTable(store, ids))
    try:
        result = app.recommend(RecommendQuery("u1", 10, device="tv", ts=int(now.value // 1e6)))
        assert not result.fallbacks and result.logged is not None
        n = len(result.logged.item_ids)
        assert n == result.pool_size > 10  # share 1.0: every ranked candidate
        start_t, end_t = t1.to_pydatetime(), (t1 + pd.Timedelta(hours=1)).to_pydatetime()
        landed: list[pd.DataFrame] = []

        def all_landed() -> bool:
            landed[:] = [FL.read_logged(paths, start_t, end_t, 10_000)]
            return len(landed[0]) == n

        wait_for(all_landed, 60, "the feature log to land", lander)
    finally:
        app.close()
        assert stop(lander) == 0
    logged = landed[0]
    assert set(logged["request_id"]) == {result.request_id}
    training = FS.training_features(store, logged)
    served = logged[list(FS.COMPARED)].to_numpy(np.float32)
    np.testing.assert_array_equal(served, training.to_numpy(np.float32))
    # the row is the logged one: real values, not defaults on both sides
    u = logged.index[logged[s.ITEM_ID] == "i1"]
    assert len(u) == 1 and training.loc[u, "session_length"].item() == 3
    assert training.loc[u, "ctx_device_code"].item() == RF.DEVICES.index("tv") + 1
    report = FS.run(None, paths, start_t, end_t, {"min_rows": 1}, store=store)
    assert report["passed"] and report["max_psi"] == 0.0 and report["rows"] == n
    assert all(f["mean_diff"] == 0.0 and f["n"] == n for f in report["features"].values())
    assert "als_score" in report["not_compared"]
    assert paths.skew_report.exists()


@pytest.mark.feast
@pytest.mark.serving
def test_a_vector_served_long_after_its_feature_rows_equals_the_training_row(paths, tmp_path):
    """``make demo`` serves today on MovieLens's 1998 rows: every activity, popularity and
    session row is years older than the request. Serving reads the online store, which keeps an
    entity's latest row whatever its age; the training path (the point-in-time join) must give
    the same row, not the defaults a view TTL would leave (with TTLs on the activity, popularity
    and session views, 20 of this request's columns differed; on the demo PSI reached 18)."""
    from serving.app import App, FeastStore, ServingConfig
    from serving.server import local_source
    from serving.validation import RecommendQuery
    from tandem.features import online as FO

    now = pd.Timestamp.now(tz="UTC").floor("s")
    t1 = now.floor("h") - pd.Timedelta(days=s.FEATURE_LOOKBACK_DAYS + 35)  # past every TTL
    store, bundle = _feast_world(paths, tmp_path, t1)
    feeds: list[Feed] = []

    class Collect:  # the records the Kafka impression logger would send, kept here
        def log(self, feed: Feed) -> None:
            feeds.append(feed)

        def close(self) -> None:
            pass

    fetch, probe = local_source(bundle)
    cfg = ServingConfig(ranker_backend="lightgbm", feature_log_share=1.0,
                        online_store_timeout_ms=5000.0, rank_deadline_ms=10_000.0)
    app = App(fetch, probe, cfg=cfg, store=FeastStore(store), sink=Collect(),
              item_features=lambda ids: FO.ItemFeatureTable(store, ids))
    try:
        result = app.recommend(RecommendQuery("u1", 10, device="tv",
                                              ts=int(now.value // 1_000_000)))
    finally:
        app.close()
    assert not result.fallbacks and feeds and feeds[-1].logged is not None
    logged = FL.logged_frame(FL.records(feeds[-1]))
    training = FS.training_features(store, logged)
    served = logged[list(FS.COMPARED)].to_numpy(np.float32)
    mismatched = [c for c in FS.COMPARED
                  if not np.array_equal(logged[c].to_numpy(np.float32), training[c].to_numpy())]
    assert mismatched == []
    np.testing.assert_array_equal(served, training.to_numpy(np.float32))
    # the stored rows, not the defaults on both sides
    i1 = logged.index[logged[s.ITEM_ID] == "i1"]
    assert len(i1) == 1 and training.loc[i1, "session_length"].item() == 3
    assert training.loc[i1, "item_avg_rating"].item() == 3.25
    assert training.loc[i1, "user_log_events_total"].item() == pytest.approx(np.log1p(9))


def test_the_demo_runs_the_gate_module_over_the_serving_interval(paths):
    """``make demo``'s skew step (``tandem.cli.demo_skew``): it counts the interval's landed rows
    and runs ``python -m jobs.feature_skew`` (the DAG task's module) over the interval with the
    demo's home, then reads the report back; too few rows: the job skips and passes."""
    from datetime import UTC, datetime

    from tandem.cli import demo_skew as DS
    from tandem.config import REPO_ROOT

    start = datetime(2026, 1, 2, 10, 15, tzinfo=UTC)
    end = datetime(2026, 1, 2, 10, 20, tzinfo=UTC)
    at = int(start.timestamp() * 1000)
    folder = FL.landing_dir(paths) / "date=2026-01-02" / "hour=10"
    folder.mkdir(parents=True)
    records = [{"request_id": "r1", s.USER_ID: "u1", s.ITEM_ID: f"i{k}", s.TS: at + k * 60_000,
                "device": "tv", s.MODEL_VERSION: "3", FL.FEATURES: {"item_ctr": 0.1}}
               for k in range(6)]  # ts +0..+5 min: the last is outside [start, end)
    (folder / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert DS.wait_landed(paths, start, end, expected=5, timeout_s=1.0) == 5
    report, code, _ = DS.run_gate(paths, start, end, {"PYTHONPATH": str(REPO_ROOT)})
    assert code == 0 and report["rows"] == 5 and report["passed"] and "skipped" in report
    assert report["interval"] == [start.isoformat(), end.isoformat()]
    assert DS.skew_table(report).row_count == 0
