"""Every DAG file parses cleanly, quickly, with the expected tasks and no cycles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.airflow


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"tandem_hourly", "tandem_daily", "tandem_experiments"}


@pytest.mark.parametrize("dag_id, tasks", [
    ("tandem_hourly", ["ingest_events", "build_labels", "build_features", "materialize",
                      "embed_new_items", "precompute_feeds"]),
    ("tandem_daily", ["negative_sampling", "build_training_table", "tune", "train_als",
                      "train_two_tower", "train_sequence", "build_index", "train_ranker",
                      "evaluate", "feature_skew", "register_bundle", "promote"]),
])
def test_chain_order_and_settings(dagbag, dag_id, tasks):
    dag = dagbag.dags[dag_id]
    order = [t.task_id for t in dag.topological_sort()]
    assert order == tasks  # a straight chain, so the topological order is unique (no cycles)
    for task in dag.tasks:
        assert task.retries >= 1 and task.execution_timeout is not None
    assert dag.catchup is False


def test_experiment_tasks_are_independent(dagbag):
    """The canary reads the stream and serving's metrics, not the report: a failed or late
    report never holds a canary step back."""
    dag = dagbag.dags["tandem_experiments"]
    assert {t.task_id for t in dag.tasks} == {"experiment_report", "canary"}
    for task in dag.tasks:
        assert not task.upstream_task_ids and task.retries >= 1
        assert task.execution_timeout is not None
    assert dag.catchup is False


def test_hourly_tasks_wait_for_the_previous_hour(dagbag):
    """Ingest dedups against the earlier hours' ids: an hour never runs before the one before."""
    hourly = dagbag.dags["tandem_hourly"]
    assert all(task.depends_on_past for task in hourly.tasks)
    assert not any(task.depends_on_past for task in dagbag.dags["tandem_daily"].tasks)


def test_daily_params_in_trigger_form(dagbag):
    params = dagbag.dags["tandem_daily"].params
    assert {"start", "end", "dataset", "force_promotion", "skip_two_tower"} <= set(params.keys())


@pytest.mark.parametrize("name", ["hourly.py", "daily.py", "experiments.py"])
def test_dag_file_runs_standalone(name, tmp_path):
    """A DAG file is configuration: running it imports no job code and exits cleanly."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW_CONFIG": str(REPO / "airflow.cfg"),
           "PYTHONPATH": str(REPO)}
    code = (f"import runpy, sys; runpy.run_path({str(REPO / 'dags' / name)!r}); "
            "assert not any(m.startswith(('jobs', 'pyspark', 'torch')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
