"""Serving follows the experiment definitions file hot; shadow scoring stays off the hot path."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pandas as pd
import pytest
from prometheus_client import REGISTRY

from serving.app import App, ItemFeatures, ServingConfig
from serving.experiments import (
    DefinitionsWatcher,
    ShadowScorer,
    overlap_at_k,
    rank_correlation,
)
from serving.server import local_source
from serving.validation import RecommendQuery
from tandem.experiments import definitions as defs
from tandem.models import synthetic_bundle as S
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


def _definition(canary_status: str = defs.RAMPING) -> defs.Definition:
    now = datetime.now(UTC)
    return defs.Definition.from_dict({
        "name": "hot", "salt": "hot", "start": (now - timedelta(days=1)).isoformat(),
        "variants": [{"name": "control", "alias": "champion"},
                     {"name": "treatment", "alias": "challenger"},
                     {"name": "shadow", "alias": "challenger", "shadow": True}],
        "canary": {"variant": "treatment", "ramp": [0.25, 0.5], "status": canary_status}})


def test_app_follows_definitions_and_scores_the_shadow(tmp_path):
    v1, features = S.build(tmp_path / "v1", SPEC)
    v2, _ = S.build(tmp_path / "v2", S.SyntheticSpec(**{**SPEC.__dict__, "seed": 7}))
    frame = pd.read_parquet(features)
    sources = {"champion": local_source(v1), "challenger": local_source(v2)}
    path = tmp_path / "experiments.json"
    defs.save(path, [_definition()])
    app = App(lambda a: sources[a][0](a), lambda a: sources[a][1](a), None,
              replace(CFG, shadow_sample=0.25), SynthStore(),
              item_features=lambda ids: ItemFeatures.from_frame(frame, pd.Index(ids)),
              definitions=DefinitionsWatcher(path))
    try:
        assert set(app.engines) == {"champion", "challenger"}
        assert [v.name for v in app.experiment.variants] == ["treatment", "control"]
        before = _sample("tandem_shadow_overlap_count", alias="challenger")
        dropped_before = _sample("tandem_shadow_dropped_total", alias="challenger")
        users = [f"u{i}" for i in range(120)]
        seen = {u: app.recommend(RecommendQuery(u, 10, ts=S.NOW_MS)).variant for u in users}
        assert 10 < sum(v == "treatment" for v in seen.values()) < 50  # ~25%
        assert all(seen[u] == app.experiment.assign(u).name for u in users)
        app.runtime.shadow.join()
        scored = _sample("tandem_shadow_overlap_count", alias="challenger") - before
        dropped = _sample("tandem_shadow_dropped_total", alias="challenger") - dropped_before
        assert scored + dropped == 30 and scored > 0  # a quarter of the 120 answered requests
        assert _sample("tandem_shadow_seconds_count", alias="challenger") >= scored
        assert 0 <= _sample("tandem_shadow_overlap_sum", alias="challenger") <= scored
        assert _sample("tandem_variant_seconds_count", experiment="hot",
                       variant="control") >= 70
        # the canary task rolls back: the next poll serves everyone the control
        time.sleep(0.01)
        defs.save(path, [_definition(defs.ROLLED_BACK)])
        app.poll_once()
        assert [v.name for v in app.experiment.variants] == ["control"]
        assert {app.recommend(RecommendQuery(u, 5, ts=S.NOW_MS)).variant
                for u in users[:30]} == {"control"}
    finally:
        app.close()


class _SlowEngine:
    def __init__(self, release: threading.Event):
        self.release = release

    def recommend(self, q, cfg, store, breaker):
        self.release.wait(5)
        raise RuntimeError("slow shadow fails after the test")


def test_full_shadow_queue_drops_and_never_blocks():
    release = threading.Event()
    scorer = ShadowScorer(lambda: {"slow": _SlowEngine(release)}, SynthStore(),
                          replace(CFG, shadow_sample=1.0), maxsize=2)
    scorer.aliases = ("slow",)
    before = _sample("tandem_shadow_dropped_total", alias="slow")
    t0 = time.perf_counter()
    for i in range(50):
        scorer.submit(RecommendQuery(f"u{i}", 5), CFG, ["i1"])
    assert time.perf_counter() - t0 < 0.05  # 50 submits against a stuck worker
    dropped = _sample("tandem_shadow_dropped_total", alias="slow") - before
    assert 47 <= dropped <= 48  # 1 taken by the worker (maybe), 2 queued, the rest dropped
    release.set()
    scorer.join()
    assert _sample("tandem_shadow_failed_total", alias="slow") >= 2
    scorer.close()


class _RecordingEngine:
    def __init__(self):
        self.users: list[str] = []

    def recommend(self, q, cfg, store, breaker):
        self.users.append(q.user_id)
        return SimpleNamespace(item_ids=["i1", "i2"])


@pytest.mark.parametrize("sample, scored", [(0.1, ["u9", "u19", "u29", "u39"]),
                                            (0.25, ["u3", "u7", "u11", "u15", "u19", "u23",
                                                    "u27", "u31", "u35", "u39"]),
                                            (0.0, [])])
def test_the_shadow_scores_its_sample_of_requests(sample, scored):
    """Every 1/sample-th request is scored a second time, the others cost the shadow nothing:
    the live traffic's CPU grows by the sample, not by a second full scoring."""
    engine = _RecordingEngine()
    scorer = ShadowScorer(lambda: {"rec": engine}, SynthStore(),
                          replace(CFG, shadow_sample=sample))
    scorer.aliases = ("rec",)
    for i in range(40):
        scorer.submit(RecommendQuery(f"u{i}", 2), CFG, ["i1", "i2"])
    scorer.join()
    assert engine.users == scored
    scorer.close()
