"""The MLflow registry: one bundle = one version, gated promotion, rollback, download, run logging.

Pure gate logic runs without a server; everything marked ``mlflow`` talks to ONE real server
(SQLite + proxied local artifacts) started for this module. Three tiny bundles are registered
once — v1 base, v2 worse (NDCG@10 -3.3 %, beyond the 2 % tolerance), v3 better — and each test
sets the aliases it starts from, so tests do not depend on their order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tandem.models import bundle as B
from tandem.models.tracking import RunLogger, metric_key, start_run
from tandem.ops.registry import (
    CHALLENGER,
    CHAMPION,
    DIGEST_TAG,
    MODEL_NAME,
    PromotionGates,
    bundle_digest,
    client_for,
    download_bundle,
    log_bundle,
    promote,
    promote_challenger,
    resolve_alias,
    rollback,
    version_metrics,
)
from tests.conftest import start_mlflow_server

BASE = {"ndcg@10": 0.300, "coverage@10": 0.30, "diversity@10": 0.70}
WORSE = {"ndcg@10": 0.290, "coverage@10": 0.30, "diversity@10": 0.70}
BETTER = {"ndcg@10": 0.310, "coverage@10": 0.35, "diversity@10": 0.72}
GATES = PromotionGates(ndcg_tolerance=0.02, min_coverage=0.1, min_diversity=0.5)


def make_bundle(root: Path, seed: int, metrics: dict[str, float]) -> Path:
    """A small bundle in the ``tandem.models.bundle`` layout: 3 items, 2 users, 4-d factors."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": ["i1", "i2", "i3"], "popularity": [3.0, 2.0, 1.0],
                             "created_at": [0, 0, 0]}), root / B.ITEMS)
    pq.write_table(pa.table({"user_id": ["u1", "u2"]}), root / B.USERS)
    for rel, rows in ((B.ALS_ITEM_FACTORS, 3), (B.ALS_USER_FACTORS, 2)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / rel, rng.standard_normal((rows, 4)).astype(np.float32))
    (root / B.RANKER_MODEL).parent.mkdir(parents=True, exist_ok=True)
    (root / B.RANKER_MODEL).write_text(f"tree\nseed={seed}\n")
    (root / B.FEATURE_SPEC).write_text(json.dumps({"features": ["f1", "f2"]}))
    parts = [B.ITEMS, B.USERS, B.ALS_ITEM_FACTORS, B.ALS_USER_FACTORS, B.RANKER_MODEL,
             B.FEATURE_SPEC]
    B.BundleManifest("tiny", parts, created_at=1_767_225_600.0 + seed, metrics=metrics,
                     params={"seed": seed}, run_ids={"als": f"als-{seed}"}).save(root)
    return root


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- pure gate logic


def test_gate_refuses_ndcg_drop_beyond_tolerance():
    d = promote(WORSE, BASE, GATES)
    assert not d.promoted and not d.forced
    assert d.numbers["ndcg_relative_change"] == pytest.approx(-1 / 30)
    assert [r for r in d.reasons if r.startswith("FAIL")] == [
        "FAIL ndcg@10 0.2900 vs champion 0.3000 (change -3.33%, tolerance -2.00%)"]


def test_gate_passes_ndcg_drop_within_tolerance():
    assert promote({**BASE, "ndcg@10": 0.2941}, BASE, GATES).promoted
    assert not promote({**BASE, "ndcg@10": 0.2939}, BASE, GATES).promoted


def test_gate_promotes_better_challenger():
    d = promote(BETTER, BASE, GATES)
    assert d.promoted
    assert all(r.startswith("PASS") for r in d.reasons)
    assert d.numbers["challenger_coverage"] == 0.35
    assert d.numbers["champion_ndcg_at_10"] == 0.30


@pytest.mark.parametrize("key, value", [("coverage@10", 0.05), ("diversity@10", 0.4)])
def test_gate_coverage_and_diversity_floors_refuse(key, value):
    d = promote({**BETTER, key: value}, BASE, GATES)
    assert not d.promoted
    assert [r.split()[1] for r in d.reasons if r.startswith("FAIL")] == [key.split("@")[0]]


def test_gate_first_model_uses_absolute_gates_only():
    assert promote(BASE, None, GATES).promoted
    assert "PASS no champion yet: absolute gates only" in promote(BASE, None, GATES).reasons
    assert not promote(BASE, None, PromotionGates(min_ndcg=0.5)).promoted


def test_gate_missing_metric_fails():
    d = promote({"ndcg@10": 0.3, "coverage@10": 0.3}, None, GATES)
    assert not d.promoted and math.isnan(d.numbers["challenger_diversity"])


def test_gate_force_promotes_and_says_so():
    d = promote(WORSE, BASE, GATES, force=True)
    assert d.promoted and d.forced
    assert d.reasons[-1] == "FORCED: promoted although gates failed"
    assert not promote(BETTER, BASE, GATES, force=True).forced


def test_mlflow_metric_names_match_evaluation_names():
    assert metric_key("ndcg@10") == "ndcg_at_10"
    logged = {metric_key(k): v for k, v in BETTER.items()}
    assert promote(logged, BASE, GATES).numbers == promote(BETTER, BASE, GATES).numbers


def test_bundle_digest_follows_content(tmp_path):
    a = make_bundle(tmp_path / "a", 1, BASE)
    b = make_bundle(tmp_path / "b", 1, BASE)
    assert bundle_digest(a) == bundle_digest(b)
    (b / B.RANKER_MODEL).write_text("tree\nseed=2\n")
    assert bundle_digest(a) != bundle_digest(b)


def test_start_run_without_tracking_uri_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with start_run("offline_job", {"alpha": 1}) as run:
        run.log_metrics({"ndcg@10": 0.1})
        run.log_artifact(tmp_path)
        run.log_dict({"a": 1}, "a.json")
    assert isinstance(run, RunLogger) and run.run_id is None and run.client is None


# -------------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_mlflow_server(tmp_path_factory.mktemp("mlflow-registry"))
    yield srv
    srv.stop()
    with pytest.raises(ProcessLookupError):  # no worker of the server's group is left
        os.killpg(srv.pid, 0)


@pytest.fixture(scope="module")
def client(server):
    return client_for(server.url)


@pytest.fixture(scope="module")
def bundles(server, tmp_path_factory):
    """v1 base, v2 worse, v3 better; maps version -> bundle dir. Challenger is v3 afterwards."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for seed, metrics in ((1, BASE), (2, WORSE), (3, BETTER)):
        bdir = make_bundle(root / f"run{seed}" / "bundle", seed, metrics)
        out[log_bundle(bdir, tracking_uri=server.url)] = bdir
    return out


def set_aliases(client, challenger: int, champion: int | None) -> None:
    client.set_registered_model_alias(MODEL_NAME, CHALLENGER, str(challenger))
    if champion is None:
        client.delete_registered_model_alias(MODEL_NAME, CHAMPION)
    else:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(champion))


def logged(client):
    return lambda version: version_metrics(version, client)


@pytest.mark.mlflow
def test_each_bundle_is_one_version_with_its_run(client, bundles):
    assert sorted(bundles) == [1, 2, 3]
    assert resolve_alias(CHALLENGER, client) == 3
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    mv = client.get_model_version(MODEL_NAME, "2")
    assert mv.tags[DIGEST_TAG] == bundle_digest(bundles[2])
    assert mv.tags["tandem.dataset"] == "tiny" and mv.tags["tandem.run_id.als"] == "als-2"
    run = client.get_run(mv.run_id)
    assert run.data.metrics == {"ndcg_at_10": 0.29, "coverage_at_10": 0.3, "diversity_at_10": 0.7}
    assert run.data.params == {"seed": "2"}
    assert "manifest.json" in [a.path for a in client.list_artifacts(mv.run_id)]


@pytest.mark.mlflow
def test_first_promotion_makes_champion(client, bundles):
    set_aliases(client, challenger=1, champion=None)
    d = promote_challenger(client, logged(client), GATES)
    assert d.promoted and d.champion_version is None
    assert resolve_alias(CHAMPION, client) == 1


@pytest.mark.mlflow
def test_worse_challenger_is_refused_and_champion_stays(client, bundles):
    set_aliases(client, challenger=2, champion=1)
    d = promote_challenger(client, logged(client), GATES)
    assert not d.promoted
    assert resolve_alias(CHAMPION, client) == 1
    tags = client.get_model_version(MODEL_NAME, "2").tags
    assert tags["tandem.promotion"] == "refused"
    assert tags["tandem.eval.ndcg_relative_change"] == "-0.0333333"


@pytest.mark.mlflow
def test_better_challenger_is_promoted(client, bundles):
    set_aliases(client, challenger=3, champion=1)
    d = promote_challenger(client, logged(client), GATES)
    assert d.promoted and (d.challenger_version, d.champion_version) == (3, 1)
    assert resolve_alias(CHAMPION, client) == 3
    assert client.get_model_version(MODEL_NAME, "3").tags["tandem.previous_champion"] == "1"


@pytest.mark.mlflow
@pytest.mark.parametrize("key", ["coverage@10", "diversity@10"])
def test_coverage_and_diversity_gates_refuse(client, bundles, key):
    """Scores come from one callback (same data for both): v3 is better but misses a floor."""
    scores = {1: BASE, 3: {**BETTER, key: 0.01}}
    set_aliases(client, challenger=3, champion=1)
    d = promote_challenger(client, scores.__getitem__, GATES)
    assert not d.promoted and resolve_alias(CHAMPION, client) == 1
    assert d.metrics == {"challenger": scores[3], "champion": BASE}


@pytest.mark.mlflow
def test_force_overrides_the_gates(client, bundles):
    set_aliases(client, challenger=2, champion=1)
    d = promote_challenger(client, logged(client), GATES, force=True)
    assert d.promoted and d.forced
    assert resolve_alias(CHAMPION, client) == 2
    assert client.get_model_version(MODEL_NAME, "2").tags["tandem.promotion"] == "forced"


@pytest.mark.mlflow
def test_challenger_already_champion_is_a_no_op(client, bundles):
    set_aliases(client, challenger=3, champion=3)
    d = promote_challenger(client, logged(client), GATES)
    assert not d.promoted and d.run_id is None and resolve_alias(CHAMPION, client) == 3


@pytest.mark.mlflow
def test_rollback_points_champion_back(client, bundles):
    set_aliases(client, challenger=3, champion=3)
    assert rollback(1, client) == 3
    assert resolve_alias(CHAMPION, client) == 1
    assert client.get_model_version(MODEL_NAME, "3").tags["tandem.rolled_back_to"] == "1"
    with pytest.raises(Exception, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        rollback(99, client)


@pytest.mark.mlflow
def test_download_champion_returns_identical_files(client, bundles, tmp_path):
    set_aliases(client, challenger=3, champion=3)
    local = download_bundle(CHAMPION, tmp_path, client)
    assert file_hashes(local) == file_hashes(bundles[3])
    assert B.BundleManifest.load(local).metrics == BETTER
    assert file_hashes(download_bundle(1, tmp_path, client)) == file_hashes(bundles[1])


@pytest.mark.mlflow
def test_pyfunc_face_maps_parts_to_local_files(server, client, bundles):
    import mlflow.pyfunc

    set_aliases(client, challenger=3, champion=3)
    mlflow.set_tracking_uri(server.url)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{CHAMPION}")
    [path] = model.predict([B.RANKER_MODEL])
    assert Path(path).read_text() == (bundles[3] / B.RANKER_MODEL).read_text()


@pytest.mark.mlflow
def test_decision_run_holds_numbers_params_and_decision(client, bundles, tmp_path):
    set_aliases(client, challenger=3, champion=1)
    d = promote_challenger(client, logged(client), GATES, params={"window": "2026-01"})
    run = client.get_run(d.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "promote"
    p = run.data.params
    assert (p["challenger_version"], p["champion_version"], p["window"]) == ("3", "1", "2026-01")
    assert (p["gate_ndcg_tolerance"], p["gate_min_coverage"], p["force"]) == ("0.02", "0.1",
                                                                              "False")
    m = run.data.metrics
    assert (m["challenger_ndcg_at_10"], m["champion_ndcg_at_10"], m["promoted"]) == (
        0.31, 0.3, 1.0)
    assert m["ndcg_relative_change"] == pytest.approx(1 / 30)
    assert run.data.tags["tandem.decision"] == "promoted"
    path = client.download_artifacts(d.run_id, "decision.json", str(tmp_path))
    saved = json.loads(Path(path).read_text())
    assert saved["promoted"] is True and saved["reasons"] == d.reasons
    assert client.get_model_version(MODEL_NAME, "3").tags["tandem.promotion_run_id"] == d.run_id


@pytest.mark.mlflow
def test_start_run_logs_params_metrics_artifacts(server, client, tmp_path):
    (tmp_path / "report.json").write_text("{}")
    with start_run("train_something", {"factors": 64}, uri=server.url) as run:
        run.log_metrics({"ndcg@10": 0.25})
        run.log_artifact(tmp_path / "report.json")
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["tandem.job"] == "train_something"
    assert got.data.params == {"factors": "64"} and got.data.metrics == {"ndcg_at_10": 0.25}
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["report.json"]
    with pytest.raises(ValueError), start_run("failing", uri=server.url) as failed:
        raise ValueError("boom")
    assert client.get_run(failed.run_id).info.status == "FAILED"


@pytest.mark.mlflow
def test_register_and_promote_jobs(server, client, bundles, paths):
    import jobs.promote
    import jobs.register_bundle
    from tandem.data.catalog import run_bundle_dir

    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    make_bundle(run_bundle_dir(paths, end), 4, {**BETTER, "ndcg@10": 0.5})
    set_aliases(client, challenger=3, champion=1)
    cfg = {"tracking_uri": server.url, "dataset": "tiny"}
    out = jobs.register_bundle.run(None, paths, start, end, cfg)
    assert out["files"] == 7 and resolve_alias(CHALLENGER, client) == out["version"] == 4
    res = jobs.promote.run(None, paths, start, end, {**cfg, "gates": {"min_diversity": 0.5}})
    assert res["promoted"] and (res["challenger"], res["champion"]) == (4, 1)
    assert resolve_alias(CHAMPION, client) == 4
    params = client.get_run(client.get_model_version(MODEL_NAME, "4").run_id).data.params
    assert params["run_id"] == "20260201" and params["end"] == end.isoformat()
