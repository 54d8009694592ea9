"""tandem_experiments through Airflow itself (``dag.test()``) on a small simulated experiment:
the report lands and a canary with a planted CTR regression is rolled back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.config import Paths
from tandem.experiments import definitions as defs

from .conftest import free_port
from .test_experiments_report import build_lake

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.airflow, pytest.mark.spark]


def test_dag_reports_and_rolls_back_a_regressed_canary(tmp_path):
    from tandem.airflow_client import airflow_env

    paths = Paths(tmp_path / "state")
    build_lake(paths, {"treatment": 0.5}, days=1,
               canary={"variant": "treatment", "ramp": [0.01, 0.05, 0.25, 0.5], "step": 2})
    reports = tmp_path / "reports"
    env = {**os.environ, **airflow_env(paths, port=free_port(),
                                       log_ports=(free_port(), free_port())),
           "TANDEM_HOME": str(paths.root), "TANDEM_REPORTS": str(reports),
           "TANDEM_TASK_RETRIES": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "tandem.airflow_client", "tandem_experiments",
                           json.dumps({"start": "2024-01-01T00:00:00+00:00",
                                       "end": "2024-01-02T00:00:00+00:00"})],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((reports / "experiment_exp1.json").read_text())
    assert report["comparisons"]["treatment"]["ctr"]["relative"] < -0.3
    (d,) = defs.load(defs.definitions_path(paths))
    assert d.canary.status == defs.ROLLED_BACK and d.canary.share == 0.0
    assert d.canary.step == 2 and "CTR" in d.canary.reason
    assert [v.name for v in d.to_ab().variants] == ["control"]
