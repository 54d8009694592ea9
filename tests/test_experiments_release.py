"""Experiment definitions (atomic file, canary traffic) and the canary decision rules."""

from __future__ import annotations

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
       "canary": {"variant": "treatment", "ramp": [0.01, 0.05, 0.25, 0.5], "step": 1,
                  "step_started": "2026-11-03T00:00:00+00:00",
                  "baseline": {"treatment": {"errors": 2, "buckets": {"0.01": 9.0, "+Inf": 10.0}}}}}


def test_definition_round_trip_and_canary_traffic(tmp_path):
    path = tmp_path / "experiments.json"
    d = defs.Definition.from_dict(DEF)
    defs.save(path, [d])
    (back,) = defs.load(path)
    assert back == d and back.canary.step_started == datetime(2026, 11, 3, tzinfo=UTC)
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
    at, counters = datetime(2026, 11, 5, tzinfo=UTC), {"treatment": {"errors": 1, "buckets": {}}}
    out = decide(c, defs.Guardrails(), _arm(0.1), _arm(**challenger), now=at, counters=counters)
    assert out.status == status
    assert reason in out.history[-1]["reason"]
    if status == defs.ROLLED_BACK:
        assert out.share == 0.0 and out.step == 1 and reason in out.reason
    elif reason == "hold":
        assert out.step == 1
    else:
        assert out.step == 2 and out.share == 0.25
        # the next step is judged from now on: its start and the counters' baseline
        assert out.step_started == at and out.baseline == counters
    if out.step == 1:  # no new step: the old start and baseline stay
        assert out.step_started is None and out.baseline == {}


def test_canary_finishes_and_stays_put():
    c = defs.Canary("treatment", step=3)
    done = decide(c, defs.Guardrails(), _arm(0.1), _arm(0.1, seed=2))
    assert done.status == defs.DONE and done.share == 0.5
    assert decide(done, defs.Guardrails(), _arm(0.1), _arm(0.01)) == done
