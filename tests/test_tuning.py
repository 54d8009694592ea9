"""The nightly Optuna study (``tandem.evaluation.tuning``, ``jobs/tune.py``): its bounds, its MLflow
runs, the validation split's time rule and how often it really runs. The trainers' use of the chosen
parameters and their trip into the registered bundle are checked on the whole nightly chain
(``tests/test_daily_chain.py``)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tandem.config import TuningSettings
from tandem.data import lake as L
from tandem.evaluation import tuning
from tandem.features.ranking_features import FEATURE_NAMES

END = datetime(2024, 1, 8, tzinfo=UTC)


def toy(params: dict) -> float:
    """A smooth objective with its best at regularization 1 (ALS's space)."""
    return -abs(np.log(params["regularization"]))


def test_study_stops_at_its_trial_bound_and_starts_with_the_defaults():
    calls = []

    def objective(params):
        calls.append(params)
        return toy(params)

    result = tuning.run_study(tuning.ALS, objective, TuningSettings(n_trials=5, timeout_s=60))
    assert len(calls) == result.trials == 5
    assert calls[0] == tuning.defaults(tuning.ALS)
    best = int(np.argmax([toy(p) for p in calls]))
    assert result.params == calls[best] and result.value == toy(calls[best])
    assert result.default_value == toy(calls[0]) <= result.value
    # seeded TPE: the same study proposes the same trials
    again = []
    tuning.run_study(tuning.ALS, lambda p: again.append(p) or toy(p),
                     TuningSettings(n_trials=5, timeout_s=60))
    assert again == calls


def test_study_stops_at_its_time_bound(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # trials untracked: ~0.25 s each

    def slow(params):
        time.sleep(0.25)
        return toy(params)

    t0 = time.perf_counter()
    result = tuning.run_study(tuning.ALS, slow, TuningSettings(n_trials=1000, timeout_s=1.0))
    elapsed = time.perf_counter() - t0
    # no trial starts after the timeout; the one running then finishes
    assert 2 <= result.trials <= 5  # of 1000 allowed
    assert elapsed < 1.0 + 0.25 + 1.0


@pytest.mark.mlflow
def test_every_trial_is_an_mlflow_run_nested_under_its_study(mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    from tandem.models.tracking import EXPERIMENT, start_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    rng = np.random.default_rng(0)
    X = rng.random((600, len(FEATURE_NAMES))).astype(np.float32)
    groups = np.repeat(np.arange(60), 10)
    y = (X[:, 0] + 0.3 * rng.random(600) > 0.9).astype(np.int32)
    from tandem.models.ranker import RANKER_CONFIG

    objective = tuning.ranker_objective(X, y, groups, {**RANKER_CONFIG, "n_jobs": 1}, seed=1)
    with start_run("tune") as job:
        result = tuning.run_study(tuning.RANKER, objective,
                                  TuningSettings(n_trials=3, timeout_s=120), job)
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    study = client.get_run(result.mlflow_run_id)
    assert study.data.tags["mlflow.parentRunId"] == job.run_id
    assert study.data.metrics["val_ndcg_at_10"] == pytest.approx(result.value)
    trials = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    assert len(trials) == result.trials == 3
    values = []
    for trial in trials:
        assert set(trial.data.params) == {"num_leaves", "learning_rate", "min_child_samples",
                                          "n_estimators"}
        assert trial.info.status == "FINISHED"
        values.append(trial.data.metrics["val_ndcg_at_10"])
    assert max(values) == pytest.approx(result.value)
    assert 0.0 < result.value <= 1.0
    assert {k: str(v) for k, v in result.params.items()} in [t.data.params for t in trials]


def write_table(root, pairs: list[tuple], n_users: int, n_items: int) -> L.TrainingTable:
    """A training table of (user, item, weight, first_ts, positive_ts or None) pairs."""
    for folder, table in (
            (L.USERS_DIR, pa.table({"user_id": [f"u{i}" for i in range(n_users)],
                                    L.USER_IDX: pa.array(range(n_users), pa.int32())})),
            (L.ITEMS_DIR, pa.table({"item_id": [f"i{i}" for i in range(n_items)],
                                    L.ITEM_IDX: pa.array(range(n_items), pa.int32())})),
            (L.INTERACTIONS_DIR, pa.table({
                L.USER_IDX: pa.array([p[0] for p in pairs], pa.int32()),
                L.ITEM_IDX: pa.array([p[1] for p in pairs], pa.int32()),
                L.WEIGHT: pa.array([p[2] for p in pairs], pa.float32()),
                L.FIRST_TS: pa.array([p[3] for p in pairs], pa.int64()),
                L.POSITIVE_TS: pa.array([p[4] for p in pairs], pa.int64()),
                # every pair engaged at its first event (an impression-only pair would be null)
                L.ENGAGED_TS: pa.array([p[3] for p in pairs], pa.int64())}))):
        (root / folder).mkdir(parents=True)
        pq.write_table(table, root / folder / "part-0.parquet")
    return L.TrainingTable(root)


def test_validation_split_holds_out_the_tail_before_the_cut(tmp_path):
    """Validation labels are first positives in [val_cut, cut); nothing from [cut, end) is a
    label or a training row unless it began before val_cut."""
    start, cut = 0, 1000  # val_fraction 0.2 -> val_cut 800
    table = write_table(tmp_path, [
        (0, 0, 2.0, 100, 100),     # train positive
        (0, 1, 1.0, 850, 850),     # validation label of user 0
        (0, 2, 3.0, 1200, 1200),   # after the cut (the evaluation's period): never seen
        (1, 0, 1.0, 200, None),    # train, not positive
        (1, 3, 2.0, 900, 1100),    # first seen in val, positive after cut: neither
        (2, 4, 1.0, 850, 850),     # a label of a user with no history: not a validation user
        (3, 2, 1.0, 700, 900),     # seen before val_cut, positive in val: a label, not train
        (3, 1, 1.0, 10, 20),
    ], n_users=4, n_items=5)
    split = tuning.validation_split(table, start, cut, TuningSettings())
    assert split.val_cut_ms == 800
    assert list(split.users) == [0, 1, 3]  # user 2 has nothing before val_cut
    users = split.users
    got = {(int(users[r]), int(c)) for r, c in zip(*split.seen.nonzero(), strict=True)}
    assert got == {(0, 0), (1, 0), (3, 1)}
    assert split.train[list(users).index(1), 0] == 1.0
    labels = {(int(users[u]), int(i)) for u, i in split.relevant.itertuples(index=False)}
    assert labels == {(0, 1), (3, 2)}
    assert sorted(users[split.val_rows]) == [0, 3]
    assert sorted(zip(split.positives["user_idx"].map(lambda r: users[r]),
                      split.positives["item_idx"], strict=True)) == [(0, 0), (3, 1)]
    # the query histories: every pre-val_cut pair that is no label, positive or not
    assert sorted(zip(split.engaged["user_idx"].map(lambda r: users[r]),
                      split.engaged["item_idx"], strict=True)) == [(0, 0), (1, 0), (3, 1)]


def test_tune_job_reuses_the_last_study_between_study_nights(paths):
    """Between studies the task copies the latest earlier study's choice; 0 turns it off."""
    from jobs import tune

    doc = tuning.study_doc(
        {tuning.ALS: tuning.StudyResult({"factors": 64}, 0.3, 0.2, 4, 1.0, None),
         tuning.TWO_TOWER: tuning.StudyResult({"dim": 32}, 0.2, 0.1, 4, 1.0, None)},
        {"run_id": "20240108", "start": "2024-01-01T00:00:00+00:00",
         "end": END.isoformat()}, TuningSettings())
    tuning.write(paths.models / "20240108", doc)
    old = {**doc, "tuned_on": {**doc["tuned_on"], "end": (END - timedelta(days=3)).isoformat()}}
    tuning.write(paths.models / "20240105", {**old, "models": {}})
    week = TuningSettings(every_days=7)
    later = END + timedelta(days=2)
    out = tune.run(None, paths, later - timedelta(days=7), later, run_id="20240110",
                   settings=week, skip_two_tower=True)
    assert out == {"source": "reused", "reused_from": "20240108"}
    reused = tuning.read(paths.models / "20240110")
    assert reused["source"] == "reused" and reused["tuned_on"]["end"] == END.isoformat()
    assert tuning.tuned_params(paths.models / "20240110", tuning.ALS) == {"factors": 64}
    assert tuning.tuned_params(paths.models / "20240110", tuning.TWO_TOWER) == {}  # skipped
    assert tuning.overlay({"factors": 32, "alpha": 2.0}, paths.models / "20240110", tuning.ALS,
                          {"alpha": 1.0}) == {"factors": 64, "alpha": 1.0}
    # a reused copy is never the source of another reuse: the next night points at the study
    nxt = later + timedelta(days=1)
    tune.run(None, paths, nxt - timedelta(days=7), nxt, run_id="20240111", settings=week)
    assert tuning.read(paths.models / "20240111")["reused_from"] == "20240108"
    off = tune.run(None, paths, nxt - timedelta(days=7), nxt, run_id="20240111",
                   settings=TuningSettings(every_days=0))
    assert off["source"] == "defaults" and tuning.read(paths.models / "20240111") is None
    assert tuning.overlay({"factors": 32}, paths.models / "20240111", tuning.ALS) == {
        "factors": 32}


def test_tune_ranker_studies_once_on_a_study_night(paths, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tandem.models.ranker import RANKER_CONFIG

    bundle = paths.models / "20240108"
    rng = np.random.default_rng(0)
    X = rng.random((400, len(FEATURE_NAMES))).astype(np.float32)
    groups = np.repeat(np.arange(40), 10)
    y = (X[:, 1] > 0.8).astype(np.int32)
    settings = TuningSettings(n_trials=2, timeout_s=60)
    assert tuning.tune_ranker(bundle, X, y, groups, RANKER_CONFIG, settings) == {}  # untuned
    tuning.write(bundle, tuning.study_doc({}, {"end": END.isoformat()}, settings))
    chosen = tuning.tune_ranker(bundle, X, y, groups, RANKER_CONFIG, settings)
    assert set(chosen) == {"num_leaves", "learning_rate", "min_child_samples", "n_estimators"}
    recorded = tuning.read(bundle)["models"][tuning.RANKER]
    assert recorded["params"] == chosen and recorded["trials"] == 2
    # a re-run of the task finds tonight's choice and does not study again
    assert tuning.tune_ranker(bundle, X[:0], y[:0], groups[:0], RANKER_CONFIG, settings) == chosen
    tags = tuning.summary_tags(tuning.read(bundle))
    assert tags["tandem.tuned.ranker.num_leaves"] == str(chosen["num_leaves"])
    assert all(re.fullmatch(r"[\w.\- :/]+", key) for key in tags)  # MLflow's tag key rule


def test_tuned_json_round_trip_keeps_types(paths):
    bundle = paths.models / "r"
    tuning.write(bundle, {"format": 1, "source": "study", "models": {
        tuning.ALS: {"params": {"factors": 16, "alpha": 3.5}}}})
    params = tuning.tuned_params(bundle, tuning.ALS)
    assert params == {"factors": 16, "alpha": 3.5} and isinstance(params["factors"], int)
    assert tuning.read(paths.models / "absent") is None
