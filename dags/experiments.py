"""tandem_experiments: the daily readout of every experiment, and one canary look.

Two independent tasks (a failed or late report never holds a canary back):

* experiment_report (Spark: aggregate the day, compare variants,
  reports/experiment_<name>.json + .html, MLflow) — the analysis a person reads;
* canary (advance, hold or roll back each ramping canary on its current step's traffic: CTR
  read from the event stream, error rate and p99 from serving's metrics; the new traffic share
  lands in the definitions file serving polls). The Airflow connection ``serving_metrics`` (its
  host: serving's /metrics URL) feeds the error-rate and latency guardrails; the broker is the
  connection ``tandem_kafka`` (its host: ``host:port``) or else the worker's
  ``KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import dag

from tandem.ops.orchestration import interval_param, python_job, spark_job

METRICS_URL = ("--metrics-url={{ conn.get('serving_metrics').host"
               " if conn.get('serving_metrics') else '' }}")
BOOTSTRAP = ("--bootstrap={{ conn.get('tandem_kafka').host"
             " if conn.get('tandem_kafka') else '' }}")


@dag(
    dag_id="tandem_experiments",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"depends_on_past": True},
    tags=["tandem", "experiments"],
    params={
        "start": interval_param("Interval start (ISO, UTC, whole days)"),
        "end": interval_param("Interval end (ISO, UTC, whole days)"),
    },
)
def tandem_experiments():
    """Daily experiment readout and canary step."""
    spark_job("experiment_report")
    python_job("tandem.experiments.canary_task", [METRICS_URL, BOOTSTRAP], run_id=False,
               task_id="canary")


tandem_experiments()
