"""Serving follows the experiment definitions file hot; shadow scoring stays off the hot path,
in a child process (serving.shadow) that a dead child or a shutdown never leaves behind."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import grpc
import pandas as pd
import psutil
import pytest
from prometheus_client import REGISTRY

from serving.app import App, ItemFeatures, ServingConfig
from serving.experiments import DefinitionsWatcher
from serving.server import local_source
from serving.shadow import NICE, ShadowScorer, overlap_at_k, rank_correlation
from serving.validation import RecommendQuery
from tandem.contracts import recommender_v1_pb2 as pb
from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc
from tandem.experiments import definitions as defs
from tandem.models import synthetic_bundle as S
from tandem.policy.ab import Experiment, Variant
from tests.conftest import free_port, wait_for_metrics
from tests.test_serving import SPEC, SynthStore

pytestmark = pytest.mark.serving
CFG = ServingConfig(ranker_backend="lightgbm", online_store_timeout_ms=200.0,
                    rank_deadline_ms=5000.0)


def test_overlap_and_rank_correlation_hand_values():
    assert overlap_at_k(["a", "b", "c"], ["c", "a", "x"], 3) == pytest.approx(2 / 3)
    # shared a, c: served ranks (0, 2), shadow ranks (1, 0): one discordant pair
    assert rank_correlation(["a", "b", "c"], ["c", "a", "x"]) == pytest.approx(-1.0)
    assert rank_correlation(["a", "b", "c", "d"], ["a", "b", "d", "c"]) == pytest.approx(2 / 3)
    assert rank_correlation(["a"], ["b"]) is None


def _sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _definition(canary_status: str = defs.RAMPING, shadow: bool = True) -> defs.Definition:
    now = datetime.now(UTC)
    return defs.Definition.from_dict({
        "name": "hot", "salt": "hot", "start": (now - timedelta(days=1)).isoformat(),
        "variants": [{"name": "control", "alias": "champion"},
                     {"name": "treatment", "alias": "challenger"},
                     *([{"name": "shadow", "alias": "challenger", "shadow": True}]
                       if shadow else [])],
        "canary": {"variant": "treatment", "ramp": [0.25, 0.5], "status": canary_status}})


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shadow")
    v1, features = S.build(root / "v1", SPEC)
    v2, _ = S.build(root / "v2", S.SyntheticSpec(**{**SPEC.__dict__, "seed": 7}))
    return {"champion": v1, "challenger": v2, "features": features}


def _app_of(bundles: dict, experiment: Experiment | None, cfg: ServingConfig = CFG,
            **kwargs) -> App:
    frame = pd.read_parquet(bundles["features"])
    sources = {a: local_source(bundles[a]) for a in ("champion", "challenger")}
    return App(lambda a: sources[a][0](a), lambda a: sources[a][1](a), experiment, cfg,
               SynthStore(), item_features=lambda ids: ItemFeatures.from_frame(
                   frame, pd.Index(ids)), **kwargs)


def _child_app(bundles: dict, aliases: tuple[str, ...]) -> App:
    """The shadow source of these tests: runs IN the child process."""
    return _app_of(bundles, Experiment("shadow", "", tuple(Variant(a, 1.0, a) for a in aliases)))


@pytest.mark.slow
def test_app_follows_definitions_and_scores_the_shadow(bundles, tmp_path):
    path = tmp_path / "experiments.json"
    defs.save(path, [_definition()])
    app = _app_of(bundles, None, replace(CFG, shadow_sample=0.25),
                  definitions=DefinitionsWatcher(path),
                  shadow_source=functools.partial(_child_app, bundles))
    try:
        assert set(app.engines) == {"champion", "challenger"}
        assert [v.name for v in app.experiment.variants] == ["treatment", "control"]
        child = psutil.Process(app.runtime.shadow.pid)
        before = _sample("tandem_shadow_overlap_count", alias="challenger")
        dropped_before = _sample("tandem_shadow_dropped_total", alias="challenger")
        users = [f"u{i}" for i in range(120)]
        seen = {u: app.recommend(RecommendQuery(u, 10, ts=S.NOW_MS)).variant for u in users}
        assert 10 < sum(v == "treatment" for v in seen.values()) < 50  # ~25%
        assert all(seen[u] == app.experiment.assign(u).name for u in users)
        app.runtime.shadow.join()
        assert child.ppid() == os.getpid() and child.nice() == NICE  # below live requests
        scored = _sample("tandem_shadow_overlap_count", alias="challenger") - before
        dropped = _sample("tandem_shadow_dropped_total", alias="challenger") - dropped_before
        assert scored + dropped == 30 and scored > 0  # a quarter of the 120 answered requests
        assert _sample("tandem_shadow_seconds_count", alias="challenger") >= scored
        assert 0 <= _sample("tandem_shadow_overlap_sum", alias="challenger") <= scored
        assert _sample("tandem_shadow_up") == 1
        assert _sample("tandem_variant_seconds_count", experiment="hot",
                       variant="control") >= 70
        # the canary task rolls back: the next poll serves everyone the control, no shadow
        time.sleep(0.01)
        defs.save(path, [_definition(defs.ROLLED_BACK, shadow=False)])
        app.poll_once()
        assert [v.name for v in app.experiment.variants] == ["control"]
        assert app.runtime.shadow is None and _gone(child)
        assert {app.recommend(RecommendQuery(u, 5, ts=S.NOW_MS)).variant
                for u in users[:30]} == {"control"}
    finally:
        app.close()


def _only_shadow_definition() -> defs.Definition:
    return defs.Definition.from_dict({
        "name": "only", "start": (datetime.now(UTC) - timedelta(days=1)).isoformat(),
        "variants": [{"name": "control", "alias": "champion"},
                     {"name": "shadow", "alias": "challenger", "shadow": True}]})


def _shadowed_app(bundles: dict, tmp_path) -> App:
    """An App serving the champion, with the challenger scoring every request in a child."""
    path = tmp_path / "experiments.json"
    defs.save(path, [_only_shadow_definition()])
    return _app_of(bundles, None, replace(CFG, shadow_sample=1.0),
                   definitions=DefinitionsWatcher(path),
                   shadow_source=functools.partial(_child_app, bundles))


def test_the_server_never_loads_a_shadow_only_alias(bundles, tmp_path):
    """A shadow-only alias's engine lives in the child alone; closing the App stops the child."""
    app = _shadowed_app(bundles, tmp_path)
    child = psutil.Process(app.runtime.shadow.pid)
    try:
        assert set(app.engines) == {"champion"}
        before = _sample("tandem_shadow_seconds_count", alias="challenger")
        for i in range(5):
            app.recommend(RecommendQuery(f"u{i}", 10, ts=S.NOW_MS))
        app.runtime.shadow.join()
        assert _sample("tandem_shadow_seconds_count", alias="challenger") - before == 5
    finally:
        app.close()
    assert _gone(child)


@pytest.mark.slow
def test_a_killed_child_never_fails_a_request_and_is_restarted(bundles, tmp_path):
    """kill -9 of the shadow child while requests run: every request is answered, the child
    comes back (counted) and scores again."""
    app = _shadowed_app(bundles, tmp_path)
    shadow = app.runtime.shadow
    try:
        app.recommend(RecommendQuery("u1", 10, ts=S.NOW_MS))
        shadow.join()  # loaded and scoring
        first, restarts = shadow.pid, _sample("tandem_shadow_restarts_total")
        answered = []
        for i in range(40):
            if i == 10:
                os.kill(first, signal.SIGKILL)
            answered.append(app.recommend(RecommendQuery(f"u{i}", 10, ts=S.NOW_MS)))
            time.sleep(0.02)
        assert all(len(r.item_ids) == 10 for r in answered)
        assert _wait(lambda: shadow.pid not in (None, first), 30)
        assert _sample("tandem_shadow_restarts_total") == restarts + 1
        shadow.join()  # what was queued while the new child loaded
        before = _sample("tandem_shadow_seconds_count", alias="challenger")
        for i in range(3):
            app.recommend(RecommendQuery(f"u{i}", 10, ts=S.NOW_MS))
        shadow.join()
        assert _sample("tandem_shadow_seconds_count", alias="challenger") - before == 3
        second = psutil.Process(shadow.pid)
    finally:
        app.close()
    assert _gone(second)


@pytest.mark.slow
def test_a_killed_server_leaves_no_shadow_child(bundles, tmp_path):
    """The real wiring (``serving.server``'s own flags build the child's engines): the child
    scores what the server answers, and a server killed -9 leaves no process behind."""
    path = tmp_path / "experiments.json"
    defs.save(path, [_only_shadow_definition()])
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "server.log"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--bundle-dir", str(bundles["champion"]),
         "--port", str(port), "--metrics-port", str(metrics_port), "--ranker-backend",
         "lightgbm", "--experiments-file", str(path), "--shadow-sample", "1"],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, stdout=log.open("w"),
        stderr=subprocess.STDOUT)
    try:
        wait_for_metrics(proc, (metrics_port,), 120, log)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RecommenderStub(channel)
            for i in range(5):
                assert len(stub.Recommend(pb.RecommendRequest(user_id=f"u{i}", k=10),
                                          timeout=30).items) == 10
        assert _wait(lambda: _scraped(metrics_port, "tandem_shadow_seconds_count") >= 5, 90), \
            log.read_text()[-3000:]
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("spawn_main" in " ".join(c.cmdline()) for c in children)
    finally:
        proc.kill()
        proc.wait(30)
    assert _gone(children)  # the shadow child and multiprocessing's resource tracker


def _scraped(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def _gone(procs) -> bool:
    """No process of ``procs`` (one or a list) runs any more (a zombie counts as gone)."""
    procs = procs if isinstance(procs, list) else [procs]
    psutil.wait_procs(procs, timeout=10)
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


class _FakeApp:
    def __init__(self, engines: dict):
        self.engines, self.store, self.cfg = engines, None, CFG

    def close(self) -> None:
        pass


class _SlowEngine:
    version = "slow"

    def recommend(self, q, cfg, store, breaker):
        time.sleep(0.3)
        raise RuntimeError("slow shadow fails")


class _EchoEngine:
    version = "echo"

    def recommend(self, q, cfg, store, breaker):
        return SimpleNamespace(item_ids=[q.user_id, "x"])


def _fake_source(kind: str, aliases: tuple[str, ...]) -> _FakeApp:
    return _FakeApp({a: {"slow": _SlowEngine, "echo": _EchoEngine}[kind]() for a in aliases})


def _broken_source(aliases: tuple[str, ...]) -> _FakeApp:
    raise RuntimeError("bundle missing")


def test_full_shadow_queue_drops_and_never_blocks():
    scorer = ShadowScorer(functools.partial(_fake_source, "slow"),
                          replace(CFG, shadow_sample=1.0), ("slow",), maxsize=2)
    try:
        before = _sample("tandem_shadow_dropped_total", alias="slow")
        failed = _sample("tandem_shadow_failed_total", alias="slow")
        t0 = time.perf_counter()
        for i in range(50):
            scorer.submit(RecommendQuery(f"u{i}", 5), {}, ["i1"])
        assert time.perf_counter() - t0 < 0.05  # 50 submits against a busy child
        dropped = _sample("tandem_shadow_dropped_total", alias="slow") - before
        assert 47 <= dropped <= 48  # 1 taken by the child (maybe), 2 queued, the rest dropped
        scorer.join()
        assert _sample("tandem_shadow_failed_total", alias="slow") - failed == 50 - dropped
    finally:
        scorer.close()


@pytest.mark.parametrize("sample, scored", [(0.1, 4), (0.25, 10), (0.0, 0)])
def test_the_shadow_scores_its_sample_of_requests(sample, scored):
    """Every 1/sample-th request is scored a second time, the others cost the shadow nothing."""
    alias = f"echo-{sample}"
    scorer = ShadowScorer(functools.partial(_fake_source, "echo"),
                          replace(CFG, shadow_sample=sample), (alias,))
    try:
        before = _sample("tandem_shadow_overlap_count", alias=alias)
        overlap = _sample("tandem_shadow_overlap_sum", alias=alias)
        for i in range(40):
            scorer.submit(RecommendQuery(f"u{i}", 2), {}, [f"u{i}", "y"])
        scorer.join()
        assert _sample("tandem_shadow_overlap_count", alias=alias) - before == scored
        # the echo answers [user, "x"] against served [user, "y"]: overlap@2 = 1/2 each
        assert _sample("tandem_shadow_overlap_sum", alias=alias) - overlap == scored / 2
    finally:
        scorer.close()


@pytest.mark.slow
def test_a_child_that_cannot_load_stops_shadowing_with_its_reason():
    scorer = ShadowScorer(_broken_source, replace(CFG, shadow_sample=1.0), ("gone",),
                          max_restarts=1)
    try:
        assert _wait(lambda: scorer.stopped_reason is not None, 60)
        assert "bundle missing" in scorer.stopped_reason and scorer.pid is None
        scorer.submit(RecommendQuery("u1", 5), {}, ["i1"])  # a no-op, never an error
        assert _sample("tandem_shadow_up") == 0
    finally:
        scorer.close()
