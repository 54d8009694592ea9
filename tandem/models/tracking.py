"""Run logging for training jobs: params, metrics and artifacts go to MLflow when it is configured.

A job wraps its work in :func:`start_run`. With ``MLFLOW_TRACKING_URI`` set (or a URI passed) it
opens an MLflow run named after the job; without one it hands back a logger that only writes debug
lines, so jobs run offline (unit tests, a laptop without a server) with the same code path.
Uses :class:`mlflow.MlflowClient` with an explicit URI: no global fluent-API state is touched.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "tandem"
MAX_PARAM_LEN = 6000  # MLflow rejects longer param values
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def metric_key(name: str) -> str:
    """An MLflow-safe metric/param name: ``ndcg@10`` -> ``ndcg_at_10``, other bad chars -> ``_``."""
    return _BAD_KEY_CHARS.sub("_", name.replace("@", "_at_"))


def tracking_uri(uri: str | None = None) -> str | None:
    """``uri`` if given, else ``MLFLOW_TRACKING_URI``, else None (tracking off)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


class RunLogger:
    """Logs to one MLflow run; with ``client=None`` every call is a debug-logged no-op.

    Attributes
    ----------
    run_id : str | None
        The MLflow run id, None when tracking is off.
    """

    def __init__(self, job_name: str, client=None, run_id: str | None = None):
        self.job_name = job_name
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values stringified, cut to MLflow's 6000-char limit)."""
        if not params:
            return
        if self.client is None:
            log.debug("[%s] params (not tracked): %s", self.job_name, dict(params))
            return
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[
            Param(metric_key(k), str(v)[:MAX_PARAM_LEN]) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log numeric metrics; names go through :func:`metric_key`."""
        if not metrics:
            return
        if self.client is None:
            log.debug("[%s] metrics (not tracked): %s", self.job_name, dict(metrics))
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(metric_key(k), float(v), ts, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, under ``artifact_path``."""
        if self.client is None:
            log.debug("[%s] artifact (not tracked): %s", self.job_name, path)
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Store ``data`` as a JSON/YAML artifact (format from the file's extension)."""
        if self.client is None:
            log.debug("[%s] %s (not tracked): %s", self.job_name, artifact_file, dict(data))
            return
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.client is None:
            return
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


def experiment_id(client, name: str = EXPERIMENT) -> str:
    """The id of experiment ``name``, created on first use."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


@contextmanager
def start_run(job_name: str, params: Mapping[str, Any] | None = None, uri: str | None = None,
              experiment: str = EXPERIMENT, parent_run_id: str | None = None
              ) -> Iterator[RunLogger]:
    """Open an MLflow run for ``job_name`` (or a no-op logger when tracking is off).

    Parameters
    ----------
    job_name : str
        Run name and ``tandem.job`` tag, e.g. ``"train_als"``.
    params : Mapping, optional
        Logged at start (hyper-parameters, interval, dataset).
    uri : str, optional
        Tracking URI; defaults to ``MLFLOW_TRACKING_URI``. Neither set -> nothing is tracked.
    parent_run_id : str, optional
        Nest the run under this one (MLflow's ``mlflow.parentRunId`` tag), e.g. a tuning trial
        under its study.

    Yields
    ------
    RunLogger
        The run is ended FINISHED on normal exit and FAILED when the block raises.
    """
    uri = tracking_uri(uri)
    if uri is None:
        log.debug("MLFLOW_TRACKING_URI not set: run %s is not tracked", job_name)
        run = RunLogger(job_name)
        run.log_params(params or {})
        yield run
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = {"tandem.job": job_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    mlflow_run = client.create_run(experiment_id(client, experiment), run_name=job_name,
                                   tags=tags)
    run = RunLogger(job_name, client, mlflow_run.info.run_id)
    try:
        run.log_params(params or {})
        yield run
    except BaseException:
        client.set_terminated(run.run_id, "FAILED")
        raise
    client.set_terminated(run.run_id, "FINISHED")
