"""Operators the DAG files wire together, so ``dags/`` stays configuration.

Every job runs out of process, the way a cluster would run it: Spark jobs through
``spark-submit --master <spark_default connection host>`` (change the connection to run the same DAG
on a cluster), plain-Python jobs (two-tower training, registry steps) through ``python -m``.
Each job receives the run's interval — the data interval, or the ``start``/``end`` params a data
engineer typed in the trigger form — so re-running a DAG run recomputes the same partitions.

Parameters are data, never code: every command is an argument list run without a shell
(:class:`tandem.ops.argv_operator.ArgvOperator`), and the string params carry a ``pattern`` so the
trigger form and the REST API refuse anything but an ISO date-time or a plain name (HTTP 400);
the jobs parse ``--start``/``--end`` as date-times and ``--run-id``/``--dataset`` as names again.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

from tandem.config import REPO_ROOT

# Templated once here; params override the data interval (a manual backfill of a date range).
START = "{{ params.start or (data_interval_start or logical_date).isoformat() }}"
# The nightly retrain learns from a trailing window ending at the interval end (param window_days).
WINDOW_START = ("{{ params.start or ((data_interval_end or logical_date)"
                " - macros.timedelta(days=params.window_days)).isoformat() }}")
END = "{{ params.end or (data_interval_end or logical_date).isoformat() }}"
RUN_ID = ("{{ (params.end or (data_interval_end or logical_date).isoformat())[:10]"
          " | replace('-', '') }}")
SPARK_MASTER = "{{ conn.spark_default.host if conn.spark_default else 'local[2]' }}"
# What a string param may hold (also checked by the jobs, tandem.ops.job_cli).
ISO_DATETIME = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?)?"
                r"(Z|[+-][0-9]{2}:[0-9]{2})?$")
NAME = r"^[A-Za-z0-9._-]{1,64}$"


def interval_param(title: str):
    """An optional ISO date-time param that overrides one end of the run's data interval."""
    from airflow.sdk import Param

    return Param(None, type=["null", "string"], pattern=ISO_DATETIME, title=title,
                 description="ISO 8601 (e.g. 2024-01-31T00:00:00+00:00). Leave empty to use "
                             "the run's data interval.")


def name_param(default: str, title: str, description: str):
    """A label param: letters, digits, ``.``, ``_`` and ``-`` only, 1 to 64 of them."""
    from airflow.sdk import Param

    return Param(default, type="string", pattern=NAME, title=title, description=description)


def job_env() -> dict[str, str]:
    """Environment every job sees: repo on PYTHONPATH, one BLAS thread, state root."""
    env = {
        "PYTHONPATH": str(REPO_ROOT),
        "OPENBLAS_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    for key in ("TANDEM_HOME", "MLFLOW_TRACKING_URI", "TANDEM_ML100K", "JAVA_HOME"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def default_retries() -> int:
    """Task retries (``TANDEM_TASK_RETRIES``, default 2); tests set 0 to fail fast."""
    return int(os.environ.get("TANDEM_TASK_RETRIES", "2"))


def _operator(task_id: str, commands: list[list[str]], timeout_min: int, retries: int | None):
    from tandem.ops.argv_operator import ArgvOperator

    return ArgvOperator(
        task_id=task_id,
        commands=commands,
        env=job_env(),
        cwd=str(REPO_ROOT),
        retries=default_retries() if retries is None else retries,
        retry_delay=timedelta(seconds=30),
        retry_exponential_backoff=True,
        execution_timeout=timedelta(minutes=timeout_min),
    )


def interval_args(extra: list[str] | None = None, run_id: bool = False) -> list[str]:
    """``--start/--end``; the nightly jobs that write one bundle get ``--run-id`` and train on the
    trailing ``window_days`` (unless the trigger form sets ``start``)."""
    args = ["--start", WINDOW_START if run_id else START, "--end", END]
    if run_id:
        args += ["--run-id", RUN_ID]
    return args + (extra or [])


def spark_job(module: str, extra: list[str] | None = None, run_id: bool = False,
              timeout_min: int = 30, retries: int | None = None):
    """A ``jobs/<module>.py`` run through spark-submit against the ``spark_default`` connection."""
    argv = [str(REPO_ROOT / ".venv" / "bin" / "spark-submit"), "--master", SPARK_MASTER,
            "--conf", "spark.ui.enabled=false", str(REPO_ROOT / "jobs" / f"{module}.py"),
            "--master", SPARK_MASTER, *interval_args(extra, run_id)]
    return _operator(module, [argv], timeout_min, retries)


def python_job(module: str, extra: list[str] | None = None, run_id: bool = True,
               timeout_min: int = 30, retries: int | None = None, task_id: str | None = None):
    """A job that needs no Spark (torch training, registry steps): ``python -m <module>``,
    where a bare name means ``jobs.<name>``."""
    target = module if "." in module else f"jobs.{module}"
    argv = [sys.executable, "-m", target, *interval_args(extra, run_id)]
    return _operator(task_id or module, [argv], timeout_min, retries)


def materialize_features(timeout_min: int = 30):
    """Apply the Feast repo (idempotent) and materialize the interval into the online store."""
    module = [sys.executable, "-m", "tandem.features.feature_store"]
    return _operator("materialize", [[*module, "apply"], [*module, "materialize",
                                                          *interval_args()]], timeout_min, None)
