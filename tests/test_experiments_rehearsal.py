"""``make experiment EXPERIMENT_ARGS=--quick``: reports/experiment.json has the issue's shape and
meets the targets (A/A false positives, power, OPE error, canary rollback)."""

from __future__ import annotations

import json

from tandem.experiments.rehearsal import main


def test_quick_rehearsal_meets_the_targets(tmp_path):
    out = tmp_path / "experiment.json"
    main(["--quick", "--out", str(out), "--bench", str(tmp_path / "no_bench.json")])
    r = json.loads(out.read_text())
    assert set(r["aa"]) == {"runs", "alpha", "false_positive_rate"}
    assert set(r["lift"]) == {"planted_relative", "users_per_variant", "runs", "power"}
    assert {"estimator", "estimate", "true_ctr", "relative_error"} <= set(r["ope"])
    assert {"planted_regression", "rolled_back", "steps_to_rollback"} <= set(r["canary"])
    assert {"p99_ms_without", "p99_ms_with"} <= set(r["shadow"])
    assert r["aa"]["runs"] >= 40 and r["aa"]["alpha"] == 0.05
    assert r["aa"]["false_positive_rate"] <= 0.08
    assert r["lift"]["planted_relative"] == 0.05 and r["lift"]["power"] >= 0.8
    assert r["ope"]["estimator"] == "dr" and r["ope"]["relative_error"] < 0.10
    assert r["canary"]["rolled_back"] and r["canary"]["steps_to_rollback"] == 1
    assert r["canary_without_regression"]["rolled_back"] is False
