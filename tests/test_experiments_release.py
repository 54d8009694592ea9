"""Experiment definitions (atomic file, canary traffic) and the canary decision rules."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest

from tandem.experiments import definitions as defs
from tandem.experiments.canary import ArmHealth, decide
from tandem.experiments.stats import Moments

DEF = {"name": "ranker-v8", "salt": "s1", "start": "2026-11-01T00:00:00+00:00",
       "end": "2026-12-01T00:00:00+00:00",
       "variants": [{"name": "control", "alias": "champion", "weight": 1},
                    {"name": "treatment", "alias": "challenger", "weight": 1},
                    {"name": "shadow", "alias": "challenger", "shadow": True}],
       "canary": {"variant": "treatment", "ramp": [0.01, 0.05, 0.25, 0.5], "step": 1}}


def test_definition_round_trip_and_canary_traffic(tmp_path):
    path = tmp_path / "experiments.json"
    d = defs.Definition.from_dict(DEF)
    defs.save(path, [d])
    (back,) = defs.load(path)
    assert back == d
    assert back.weights() == pytest.approx({"treatment": 0.05, "control": 0.95})
    split = back.to_ab()
    assert [v.name for v in split.variants] == ["treatment", "control"]  # canary first
    assert back.shadow_aliases == ("challenger",) and back.control == "control"
    users = [f"u{i}" for i in range(20_000)]
    share = np.mean([split.assign(u).name == "treatment" for u in users])
    assert share == pytest.approx(0.05, abs=0.006)
    # a bigger step keeps every user the canary already had (monotone ramp)
    bigger = back.with_canary(defs.Canary("treatment", back.canary.ramp, 2)).to_ab()
    had = [u for u in users[:2000] if split.assign(u).name == "treatment"]
    assert all(bigger.assign(u).name == "treatment" for u in had)
    rolled = back.with_canary(defs.Canary("treatment", status=defs.ROLLED_BACK)).to_ab()
    assert [v.name for v in rolled.variants] == ["control"]
    assert defs.active([d], datetime(2026, 11, 5, tzinfo=UTC)) == d
    assert defs.active([d], datetime(2026, 12, 5, tzinfo=UTC)) is None
    assert not list(tmp_path.glob(".experiments.*"))  # no temporary file left behind


def _arm(ctr: float, n: int = 3000, errors: int = 0, p99: float = 30.0, seed: int = 0
         ) -> ArmHealth:
    rng = np.random.default_rng(seed)
    imps = rng.integers(5, 30, n)
    return ArmHealth(requests=n * 2, errors=errors, p99_ms=p99,
                     ctr=Moments.of(imps, rng.binomial(imps, ctr)))


@pytest.mark.parametrize("challenger, status, reason", [
    (dict(ctr=0.1, errors=600), defs.ROLLED_BACK, "error rate"),
    (dict(ctr=0.1, p99=400.0), defs.ROLLED_BACK, "p99"),
    (dict(ctr=0.08), defs.ROLLED_BACK, "CTR"),
    (dict(ctr=0.1, seed=1), defs.RAMPING, "advanced to 25%"),
    (dict(ctr=0.1, n=20, seed=1), defs.RAMPING, "hold"),
])
def test_canary_decisions(challenger, status, reason):
    c = defs.Canary("treatment", step=1)
    out = decide(c, defs.Guardrails(), _arm(0.1), _arm(**challenger))
    assert out.status == status
    assert reason in out.history[-1]["reason"]
    if status == defs.ROLLED_BACK:
        assert out.share == 0.0 and out.step == 1 and reason in out.reason
    elif reason == "hold":
        assert out.step == 1
    else:
        assert out.step == 2 and out.share == 0.25


def test_canary_finishes_and_stays_put():
    c = defs.Canary("treatment", step=3)
    done = decide(c, defs.Guardrails(), _arm(0.1), _arm(0.1, seed=2))
    assert done.status == defs.DONE and done.share == 0.5
    assert decide(done, defs.Guardrails(), _arm(0.1), _arm(0.01)) == done


def test_canary_task_reads_serving_metrics_and_the_report(tmp_path):
    """Prometheus text -> (requests, errors, p99) per variant; a report's moments -> a step."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from tandem.experiments.canary_task import serving_health, step_all

    reg = CollectorRegistry()
    seconds = Histogram("tandem_variant_seconds", "", ["experiment", "variant"],
                        buckets=(0.01, 0.05, 0.2), registry=reg)
    errors = Counter("tandem_variant_errors", "", ["experiment", "variant"], registry=reg)
    for _ in range(95):
        seconds.labels("e", "treatment").observe(0.005)
    for _ in range(5):
        seconds.labels("e", "treatment").observe(0.1)  # 5% of requests in (0.05, 0.2]
    errors.labels("e", "treatment").inc(3)
    seconds.labels("other", "treatment").observe(1.0)  # another experiment: ignored
    health = serving_health(generate_latest(reg).decode(), "e")
    assert health == {"treatment": (100, 3, 200.0)}  # p99 falls in the 200 ms bucket

    path = tmp_path / "experiments.json"
    d = defs.Definition.from_dict({**DEF, "name": "e"})
    defs.save(path, [d])
    arm = {"n": 3000, "sx": 60000.0, "sy": 6000.0, "sxx": 1.5e6, "syy": 15000.0,
           "sxy": 150000.0}
    (tmp_path / "experiment_e.json").write_text(json.dumps(
        {"moments": {"control": {"ctr": arm}, "treatment": {"ctr": arm}}}))
    (changed,) = step_all(path, tmp_path, generate_latest(reg).decode())
    assert changed["status"] == defs.ROLLED_BACK and "error rate 0.0300" in changed["reason"]
    assert defs.load(path)[0].canary.status == defs.ROLLED_BACK
