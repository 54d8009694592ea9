"""The nightly chain (dags/daily.py) end to end: one bundle that is promoted and served.

A small synthetic world (300 users, 200 items, ~30k events over 3 days: the chain's cost grows
with the interval's days and hours, what it proves does not) is written as landing files and
ingested once for the module, and its negatives (a pure function of the lake and the interval)
are sampled once for the module too. Each test then runs every job of ``tandem_daily``
in-process, in DAG order, with one run id -- negative_sampling -> build_training_table -> tune
-> train_als -> train_two_tower (or skipped) -> train_sequence -> build_index -> train_ranker ->
evaluate -> register_bundle -> promote -- against the session's MLflow server, downloads the
``champion`` and asks serving for recommendations.

The alignment checks are the point: every array of the bundle must be indexed by the catalog
order of its ``items.parquet`` / ``users.parquet``, whichever job wrote them.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import scipy.sparse as sp

from tandem import schema as s
from tandem.config import Paths
from tandem.models import bundle as B

START = datetime(2024, 1, 1, tzinfo=UTC)  # WorldConfig.start_ms
DAYS = 3
END = START + timedelta(days=DAYS)
RUN_ID = f"{END:%Y%m%d}"  # the DAG's run id: the interval's end date
END_MS = int(END.timestamp() * 1000)
DATASET = "world-300x200"
# the tuned parameters decide the models' sizes (a short study: the chain's wiring is under
# test, not model quality); one torch thread; a small sequence model
TWO_TOWER = {"num_threads": 1}
SEQUENCE = {"sequence": {"epochs": 3, "dim": 32, "max_len": 20}}
MODELS = {"two_tower": TWO_TOWER}  # ranker and evaluate
FULL = (B.ITEMS, B.USERS, B.ALS_USER_FACTORS, B.ALS_ITEM_FACTORS, B.TT_ITEM_VECTORS,
        B.TT_USER_TOWER, B.INDEX_MAIN, B.INDEX_ALS, B.RANKER_MODEL, B.RANKER_COOC,
        B.FEATURE_SPEC, B.SEQ_ITEM_VECTORS, B.SEQ_MODEL, B.INDEX_SEQUENCE)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory) -> Paths:
    """The world's landing files ingested into lake/events (late arrivals: one extra day)."""
    from jobs import ingest_events
    from tandem.data.world import World
    from tandem.data.world_config import WorldConfig

    paths = Paths(tmp_path_factory.mktemp("daily") / "tandem")
    world = World.generate(WorldConfig(n_users=300, n_items=200, n_events_target=30_000,
                                       days=DAYS, seed=0))
    world.write(paths)
    counts = ingest_events.run(spark, paths, START, END + timedelta(days=1))
    assert counts["valid"] > 25_000 and counts["invalid"] == 0
    return paths


@pytest.fixture(scope="module")
def negatives(spark, lake) -> dict:
    """The chain's first task, once for the module: its output is keyed by the interval's days
    (no run id), so both chains read the same negatives; a second run would rewrite them equal."""
    from jobs import negative_sampling

    counts = negative_sampling.run(spark, lake, START, END)
    assert counts["positives"] > 0 and counts["retrieval"] > 0, counts
    return counts


@pytest.fixture(autouse=True)
def short_study(monkeypatch):
    """Three trials a model (the defaults and two TPE proposals), tuned every night."""
    for key, value in {"TANDEM_TUNE_TRIALS": "3", "TANDEM_TUNE_TIMEOUT_S": "60",
                       "TANDEM_TUNE_EVERY_DAYS": "1"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def registry(mlflow_server, monkeypatch):
    """The session's MLflow server as MLFLOW_TRACKING_URI, with no ``champion`` alias yet
    (other tests share the registry; each chain test starts from "no champion")."""
    from tandem.ops.registry import CHAMPION, MODEL_NAME, client_for, resolve_alias

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = client_for()
    if resolve_alias(CHAMPION, client) is not None:
        client.delete_registered_model_alias(MODEL_NAME, CHAMPION)
    return client


def run_chain(spark, paths: Paths, run_id: str, skip_two_tower: bool,
              negatives: dict) -> dict[str, dict]:
    """Every task of tandem_daily, in order, as the DAG runs them (one interval, one run id);
    the first, negative_sampling, ran once for the module (``negatives``: its counts)."""
    from jobs import (
        build_index,
        build_training_table,
        evaluate,
        feature_skew,
        promote,
        register_bundle,
        train_als,
        train_ranker,
        train_sequence,
        train_two_tower,
        tune,
    )

    out = {"negative_sampling": negatives,
           "build_training_table": build_training_table.run(spark, paths, START, END,
                                                            run_id=run_id),
           "tune": tune.run(None, paths, START, END, {"two_tower": TWO_TOWER}, run_id=run_id,
                            skip_two_tower=skip_two_tower),
           "train_als": train_als.run(None, paths, START, END, run_id=run_id)}
    out["train_two_tower"] = (
        train_two_tower.skip(paths, END, run_id) if skip_two_tower  # main()'s --skip
        else train_two_tower.run(None, paths, START, END, {"two_tower": TWO_TOWER},
                                 run_id=run_id))
    out["train_sequence"] = train_sequence.run(None, paths, START, END, SEQUENCE, run_id=run_id)
    out["build_index"] = build_index.run(None, paths, START, END, run_id=run_id)
    out["train_ranker"] = train_ranker.run(None, paths, START, END, MODELS, run_id=run_id)
    out["evaluate"] = evaluate.run(None, paths, START, END, MODELS, run_id=run_id,
                                   dataset=DATASET)
    # no serving ran in this world: nothing logged, nothing judged, the gate passes
    out["feature_skew"] = feature_skew.run(None, paths, START, END, run_id=run_id)
    assert out["feature_skew"]["passed"] and out["feature_skew"]["rows"] == 0
    out["register_bundle"] = register_bundle.run(None, paths, START, END, {"dataset": DATASET},
                                                 run_id=run_id)
    out["promote"] = promote.run(None, paths, START, END, {}, run_id=run_id)
    return out


def lake_window(paths: Paths) -> pd.DataFrame:
    """(user_id, item_id, event_type) of every event the chain trained on."""
    return ds.dataset(paths.events, format="parquet", partitioning="hive").to_table(
        columns=[s.USER_ID, s.ITEM_ID, s.EVENT_TYPE],
        filter=(ds.field(s.TS) >= int(START.timestamp() * 1000))
        & (ds.field(s.TS) < END_MS)).to_pandas()


def check_alignment(paths: Paths, bundle, two_tower: bool) -> None:
    """Every array follows items.parquet / users.parquet, checked against the raw events."""
    from jobs import build_training_table

    items = pd.read_parquet(bundle / B.ITEMS)
    users = pd.read_parquet(bundle / B.USERS)
    n_items, n_users = len(items), len(users)
    assert n_items == 200 and n_users == 300
    assert list(items.columns) == [s.ITEM_ID, "popularity", s.CREATED_AT]
    als_items = np.load(bundle / B.ALS_ITEM_FACTORS)
    als_users = np.load(bundle / B.ALS_USER_FACTORS)
    assert als_items.shape[0] == n_items and als_users.shape[0] == n_users
    cooc = sp.load_npz(bundle / B.RANKER_COOC)
    assert cooc.shape == (n_items, n_items)

    events = lake_window(paths)
    item_idx = pd.Index(items[s.ITEM_ID]).get_indexer(events[s.ITEM_ID])
    user_idx = pd.Index(users[s.USER_ID]).get_indexer(events[s.USER_ID])
    assert (item_idx >= 0).all() and (user_idx >= 0).all()
    # popularity = distinct users per item, in catalog order
    pop = pd.Series(user_idx).groupby(item_idx).nunique().reindex(range(n_items), fill_value=0)
    np.testing.assert_array_equal(items["popularity"].to_numpy(), pop.to_numpy())
    # ALS: a user's engaged items rank in the top of their scores (a shuffled order would not)
    engaged = (events[s.EVENT_TYPE] != s.IMPRESSION).to_numpy()
    users_e, items_e = user_idx[engaged], item_idx[engaged]
    scores = als_users @ als_items.T
    percentile = (scores[users_e] < scores[users_e, items_e][:, None]).mean(axis=1)
    assert percentile.mean() > 0.8
    pairs = np.unique(np.c_[user_idx, item_idx], axis=0)
    # co-occurrence (top-K per item, computed in Spark): nonzero only where two items share a
    # user, and every row keeps its K best (or all it has)
    binary = sp.csr_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                           shape=(n_users, n_items))
    shared = (binary.T @ binary).toarray()
    np.fill_diagonal(shared, 0)
    top_k = build_training_table.CONFIG["cooc_top_k"]
    assert not (cooc.toarray() > 0)[shared == 0].any()
    np.testing.assert_array_equal(np.diff(cooc.indptr), np.minimum((shared > 0).sum(1), top_k))
    assert (np.diff(cooc.indptr) == top_k).any()  # the cap binds in this world
    if two_tower:
        vectors = np.load(bundle / B.TT_ITEM_VECTORS)
        assert vectors.shape[0] == n_items
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def check_tuning(bundle, local, version: int, registry, two_tower: bool) -> dict:
    """The night's chosen parameters are what every trainer used, and they travel with the
    registered version (the file in the bundle, tags on the version)."""
    import json

    from tandem.evaluation import tuning
    from tandem.ops.registry import MODEL_NAME

    doc = tuning.read(bundle)
    models = {"als", "ranker"} | ({"two_tower"} if two_tower else set())
    assert set(doc["models"]) == models
    als = doc["models"]["als"]["params"]
    fitted = json.loads((bundle / B.ALS_ITEM_FACTORS).with_name("meta.json").read_text())
    assert {k: fitted["config"][k] for k in als} == als
    assert np.load(bundle / B.ALS_ITEM_FACTORS).shape[1] == als["factors"]
    ranker = doc["models"]["ranker"]["params"]
    text = (bundle / B.RANKER_MODEL).read_text()
    for key, value in {"num_leaves": ranker["num_leaves"], "num_iterations": ranker[
            "n_estimators"], "min_data_in_leaf": ranker["min_child_samples"],
            "learning_rate": ranker["learning_rate"]}.items():
        written = re.search(rf"\[{key}: ([^\]]+)\]", text)  # LightGBM's parameter lines
        assert written and float(written.group(1)) == pytest.approx(value, rel=1e-6), key
    if two_tower:
        tower = json.loads(str(np.load(bundle / B.TT_USER_TOWER)["config"]))
        tt = doc["models"]["two_tower"]["params"]
        assert {k: tower[k] for k in tt} == tt
        assert np.load(bundle / B.TT_ITEM_VECTORS).shape[1] == tt["dim"]
    assert tuning.read(local) == doc  # downloaded with the version
    tags = registry.get_model_version(MODEL_NAME, str(version)).tags
    assert tags["tandem.tuned.als.factors"] == str(als["factors"])
    assert tags["tandem.tuned.ranker.num_leaves"] == str(ranker["num_leaves"])
    return doc


def serve_champion(registry, tmp_path, version: int):
    """Download ``champion`` and build the serving App over it (the registry source's path)."""
    from serving.app import App, ServingConfig
    from tandem.ops.registry import CHAMPION, download_bundle

    local = download_bundle(CHAMPION, tmp_path / "bundles", registry)
    cfg = ServingConfig(ranker_backend="lightgbm", rank_deadline_ms=30_000.0,
                        online_store_timeout_ms=1_000.0)
    return App(lambda alias: (local, str(version)), lambda alias: str(version), cfg=cfg), local


def check_serving(app, bundle) -> None:
    """A user with a history gets k ranked, unique catalog items; a stranger the cold path."""
    from serving.validation import RecommendQuery

    users = pd.read_parquet(bundle / B.USERS)[s.USER_ID]
    active = users[int(np.argmax(np.linalg.norm(np.load(bundle / B.ALS_USER_FACTORS), axis=1)))]
    result = app.recommend(RecommendQuery(active, 10, ts=END_MS))
    catalog = set(pd.read_parquet(bundle / B.ITEMS)[s.ITEM_ID])
    assert len(result.item_ids) == 10 and len(set(result.item_ids)) == 10
    assert set(result.item_ids) <= catalog
    assert not result.cold_start and result.fallbacks == []  # ranked, nothing degraded
    cold = app.recommend(RecommendQuery("never-seen-user", 5, ts=END_MS))
    assert cold.cold_start and len(cold.item_ids) == 5
    assert len(app.similar(sorted(catalog)[0], 5).item_ids) == 5


@pytest.mark.spark
@pytest.mark.mlflow
@pytest.mark.slow
def test_daily_chain_builds_promotes_and_serves_one_bundle(spark, lake, negatives, registry,
                                                          tmp_path):
    from tandem.ops.registry import CHAMPION, resolve_alias, version_metrics

    out = run_chain(spark, lake, RUN_ID, skip_two_tower=False, negatives=negatives)
    bundle = lake.models / RUN_ID
    assert all((bundle / part).exists() for part in (*FULL, B.MANIFEST))
    check_alignment(lake, bundle, two_tower=True)

    manifest = B.BundleManifest.load(bundle)
    assert manifest.dataset == DATASET and manifest.parts == list(FULL)
    for name in ("ndcg@10", "coverage@10", "diversity@10"):
        assert manifest.metrics[name] == manifest.metrics[f"two_stage.{name}"]
        assert 0.0 < manifest.metrics[name] <= 1.0
    assert {"als.ndcg@10", "two_tower.ndcg@10", "popularity.ndcg@10"} <= set(manifest.metrics)
    assert manifest.params["two_tower"] is True
    assert out["train_ranker"]["feature_source"] == "history"  # no Feast repo in this lake
    report = json.loads((bundle / "eval.json").read_text())  # evaluate scored as it trained
    assert report["protocol"]["feature_source"] == "history"

    version = out["register_bundle"]["version"]
    assert version_metrics(version, registry)["ndcg_at_10"] == pytest.approx(
        manifest.metrics["ndcg@10"])
    assert out["promote"]["promoted"] and not out["promote"]["forced"]
    assert out["promote"]["challenger"] == version
    assert resolve_alias(CHAMPION, registry) == version

    app, local = serve_champion(registry, tmp_path, version)
    engine = app.engines[CHAMPION]
    assert engine.tower is not None and engine.main_index is not None
    check_serving(app, local)
    doc = check_tuning(bundle, local, version, registry, two_tower=True)
    assert out["tune"]["source"] == doc["source"] == "study"
    for model in ("als", "two_tower", "ranker"):  # three trials, the first the defaults
        result = doc["models"][model]
        assert result["trials"] == 3 and result["value"] >= result["default_value"]


@pytest.mark.spark
@pytest.mark.mlflow
@pytest.mark.slow
def test_daily_chain_without_two_tower_serves_als_only(spark, lake, negatives, registry,
                                                      tmp_path):
    from tandem.ops.registry import CHAMPION, resolve_alias

    out = run_chain(spark, lake, f"{RUN_ID}-als", skip_two_tower=True, negatives=negatives)
    bundle = lake.models / f"{RUN_ID}-als"
    assert not (bundle / "two_tower").exists() and not (bundle / B.INDEX_MAIN).exists()
    check_alignment(lake, bundle, two_tower=False)
    manifest = B.BundleManifest.load(bundle)
    assert manifest.parts == [p for p in FULL if not p.startswith(("two_tower/", B.INDEX_MAIN))]
    assert manifest.params["two_tower"] is False
    assert "two_tower.ndcg@10" not in manifest.metrics
    assert set(out["build_index"]) == {k for k in out["build_index"]
                                       if k.startswith(("als_", "sequence_"))}

    version = out["register_bundle"]["version"]
    assert out["promote"]["promoted"] and resolve_alias(CHAMPION, registry) == version
    app, local = serve_champion(registry, tmp_path, version)
    engine = app.engines[CHAMPION]
    assert engine.tower is None and engine.main_index is None
    check_serving(app, local)
    # the first chain test's study (same interval) is reused, or studied here when run alone
    assert check_tuning(bundle, local, version, registry, two_tower=False)["source"] in (
        "reused", "study")


@pytest.mark.airflow
@pytest.mark.parametrize("skip_two_tower", [False, True])
def test_dag_commands_match_the_jobs_command_lines(tmp_path, monkeypatch, skip_two_tower):
    """Each tandem_daily task's argument list, rendered as Airflow renders it, parses in its
    job's main() and reaches run() with the interval and the run id (runs stubbed out)."""
    import importlib
    from pathlib import Path

    import jinja2

    repo = Path(__file__).resolve().parents[1]
    for key, value in {"AIRFLOW_HOME": str(tmp_path / "airflow"),
                       "AIRFLOW_CONFIG": str(repo / "airflow.cfg"),
                       "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
                       "TANDEM_HOME": str(tmp_path / "tandem")}.items():
        monkeypatch.setenv(key, value)
    from airflow.dag_processing.dagbag import DagBag

    import tandem.spark.entry

    dag = DagBag(dag_folder=str(repo / "dags")).dags["tandem_daily"]
    params = {"start": START.isoformat(), "end": END.isoformat(), "dataset": DATASET,
              "force_promotion": True, "skip_two_tower": skip_two_tower}
    context = {"params": params, "data_interval_start": None, "data_interval_end": None,
               "logical_date": None, "conn": {}}

    class Session:
        def stop(self) -> None:
            pass

    monkeypatch.setattr(tandem.spark.entry, "get_spark", lambda *a, **k: Session())
    calls = {}
    for task in dag.topological_sort():
        (command,) = task.commands  # one argument list per daily task, no shell
        argv = [arg for arg in (jinja2.Template(a).render(**context) for a in command) if arg]
        if argv[0].endswith("spark-submit"):  # spark-submit ... jobs/<name>.py <job args>
            script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
            name, args = Path(argv[script]).stem, argv[script + 1:]
            assert args[:2] == ["--master", "local[2]"]
        else:  # python -m jobs.<name> <job args>
            assert argv[1:3] == ["-m", f"jobs.{task.task_id}"]
            name, args = task.task_id, argv[3:]
        module = importlib.import_module(f"jobs.{name}")

        def record(*a, _name=name, **k):
            calls[_name] = (a, k)
            return {}

        monkeypatch.setattr(module, "run", record)
        if hasattr(module, "get_spark"):
            monkeypatch.setattr(module, "get_spark", lambda *a, **k: Session())
        module.main(args)
    ran = [t.task_id for t in dag.topological_sort()]
    assert list(calls) == [t for t in ran if not (skip_two_tower and t == "train_two_tower")]
    for name, (args, kwargs) in calls.items():
        assert [a for a in args if isinstance(a, datetime)] == [START, END], name
        if name != "negative_sampling":  # an interval job: its outputs are keyed by date
            assert kwargs["run_id"] == RUN_ID, name
    assert calls["evaluate"][1]["dataset"] == DATASET
    assert calls["register_bundle"][0][4]["dataset"] == DATASET
    assert calls["promote"][0][4]["force"] is True


def test_skip_two_tower_removes_an_earlier_attempts_parts(paths):
    """A re-run with skip_two_tower must not ship the vectors a previous attempt left behind."""
    from jobs import train_two_tower

    bundle = paths.models / RUN_ID
    kept = [B.ALS_ITEM_FACTORS, B.INDEX_ALS, B.INDEX_ALS + ".json"]
    stale = [B.TT_ITEM_VECTORS, B.TT_USER_TOWER, B.INDEX_MAIN, B.INDEX_MAIN + ".json"]
    for rel in kept + stale:
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_bytes(b"x")
    out = train_two_tower.skip(paths, END, None)  # run id = the end date, like the DAG's
    assert out["removed"] == len(stale)
    assert [rel for rel in kept + stale if (bundle / rel).exists()] == kept
