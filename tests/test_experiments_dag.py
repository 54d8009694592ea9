"""tandem_experiments through Airflow itself (``dag.test()``) on a small simulated experiment:
the report lands from the lake and a canary with a planted CTR regression is rolled back from
the same events on the stream, with the same CTR difference as the report's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.compute as pc
import pytest

from tandem import schema as s
from tandem.config import Paths
from tandem.experiments import definitions as defs

from .conftest import free_port
from .test_experiments_report import build_lake

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.kafka]


def test_dag_reports_and_rolls_back_a_regressed_canary(tmp_path, kafka_broker):
    from tandem.data.landing import event_records
    from tandem.ops.airflow_client import airflow_env
    from tandem.streaming.producer import EventProducer
    from tandem.streaming.topics import ensure_topics

    paths = Paths(tmp_path / "state")
    events = build_lake(paths, {"treatment": 0.5}, days=1,
                        canary={"variant": "treatment", "ramp": [0.01, 0.05, 0.25, 0.5],
                                "step": 2})
    # what serving and the clients sent that day: the report's day (impressions before
    # midnight, their engagements up to the attribution window after), as the stream has it
    end_ms = int(datetime(2024, 1, 2, tzinfo=UTC).timestamp() * 1000)
    imp = pc.equal(events.column(s.EVENT_TYPE), s.IMPRESSION)
    ts = events.column(s.TS)
    day = events.filter(pc.if_else(imp, pc.less(ts, end_ms), pc.less_equal(
        ts, end_ms + int(defs.ATTRIBUTION_WINDOW.total_seconds() * 1000))))
    ensure_topics(kafka_broker.bootstrap)
    producer = EventProducer(kafka_broker.bootstrap, client_id="test-experiments-dag")
    producer.send_many(event_records(day))
    producer.flush(30)
    producer.close()
    reports = tmp_path / "reports"
    env = {**os.environ, **airflow_env(paths, port=free_port(),
                                       log_ports=(free_port(), free_port())),
           "TANDEM_HOME": str(paths.root), "TANDEM_REPORTS": str(reports),
           "TANDEM_TASK_RETRIES": "0", "KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "tandem.ops.airflow_client", "tandem_experiments",
                           json.dumps({"start": "2024-01-01T00:00:00+00:00",
                                       "end": "2024-01-02T00:00:00+00:00"})],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((reports / "experiment_exp1.json").read_text())
    assert report["comparisons"]["treatment"]["ctr"]["relative"] < -0.3
    (d,) = defs.load(defs.definitions_path(paths))
    assert d.canary.status == defs.ROLLED_BACK and d.canary.share == 0.0
    assert d.canary.step == 2 and "CTR" in d.canary.reason
    # one definition of CTR: the stream's look and the lake's report agree to the last digit
    look = d.canary.history[-1]
    assert look["ctr_diff"] == pytest.approx(report["comparisons"]["treatment"]["ctr"]["diff"],
                                             rel=1e-9)
    assert look["stream"]["complete"] and look["since"] == "2024-01-01T00:00:00+00:00"
    assert [v.name for v in d.to_ab().variants] == ["control"]
