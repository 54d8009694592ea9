"""Run Airflow for the embedded default and drive it through its REST API (v2).

``make demo`` uses this to start ``airflow standalone`` (SQLite metadata, LocalExecutor), then
unpauses and triggers the Tandem DAGs exactly as a data engineer's "Trigger" button would.
Auth: the SimpleAuthManager user ``admin`` from airflow.cfg; its generated password is read from
``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tandem.config import REPO_ROOT, Paths
from tandem.ops import processes

log = logging.getLogger(__name__)

TERMINAL = {"success", "failed"}


def airflow_env(paths: Paths, port: int = 8080, log_ports: tuple[int, int] = (8793, 8794)
                ) -> dict[str, str]:
    """Environment for every Airflow process (standalone, CLI, dag.test) of this state root.

    ``port`` is the API/UI port; ``log_ports`` the worker and triggerer log servers (tests pick
    free ones so two Airflows never collide).
    """
    home = paths.root / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    # One JWT secret shared by the API server and the scheduler's task runners (left empty, each
    # process generates its own and every task fails with "Invalid auth token").
    secret_file = home / "jwt_secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_hex(32))
        secret_file.chmod(0o600)
    return {
        "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text().strip(),
        "AIRFLOW__API__SECRET_KEY": secret_file.read_text().strip(),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW_CONFIG": str(REPO_ROOT / "airflow.cfg"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_ports[0]),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(log_ports[1]),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW_CONN_SPARK_DEFAULT": os.environ.get(
            "AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[2]"})),
        "TANDEM_HOME": str(paths.root),
        "PYTHONPATH": str(REPO_ROOT),
        # standalone spawns `airflow ...` subprocesses by name: the venv's bin must be on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OPENBLAS_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def start_standalone(paths: Paths, port: int = 8080, log_ports: tuple[int, int] = (8793, 8794),
                     extra_env: dict[str, str] | None = None, timeout_s: float = 300
                     ) -> AirflowClient:
    """Start (or reuse) ``airflow standalone`` and wait until its API answers."""
    env = {**airflow_env(paths, port, log_ports), **(extra_env or {})}
    airflow_bin = str(Path(sys.executable).parent / "airflow")
    processes.start(paths.run, "airflow", [airflow_bin, "standalone"], env=env)
    client = AirflowClient(f"http://127.0.0.1:{port}", Path(env["AIRFLOW_HOME"]))
    client.wait_healthy(timeout_s)
    return client


@dataclass
class AirflowClient:
    base_url: str
    home: Path
    username: str = "admin"
    _token: str | None = None

    def password(self) -> str:
        data = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        return data[self.username]

    def _request(self, method: str, path: str, body: dict | None = None, auth: bool = True):
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def token(self) -> str:
        if self._token is None:
            self._token = self._request("POST", "/auth/token", {
                "username": self.username, "password": self.password()}, auth=False)[
                "access_token"]
        return self._token

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                health = self._request("GET", "/api/v2/monitor/health", auth=False)
                pw_file = self.home / "simple_auth_manager_passwords.json.generated"
                if health["scheduler"]["status"] == "healthy" and pw_file.exists():
                    return
            except (urllib.error.URLError, ConnectionError, KeyError, TimeoutError):
                pass
            time.sleep(1)
        raise TimeoutError(f"Airflow at {self.base_url} not healthy after {timeout_s}s")

    def wait_dag_parsed(self, dag_id: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._request("GET", f"/api/v2/dags/{dag_id}")
                return
            except urllib.error.HTTPError as err:
                if err.code != 404:
                    raise
            time.sleep(2)
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout_s}s")

    def trigger(self, dag_id: str, conf: dict) -> str:
        """Unpause ``dag_id`` and start a run with ``conf`` (the trigger form's params)."""
        self.wait_dag_parsed(dag_id)
        self._request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self._request("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                            {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        run_path = urllib.request.quote(run_id, safe="")
        return self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_path}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        """The run's task instances by task id (``state``, ``duration`` in s, dates, ...)."""
        run_path = urllib.request.quote(run_id, safe="")
        data = self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_path}/taskInstances")
        return {t["task_id"]: t for t in data["task_instances"]}

    def wait_run(self, dag_id: str, run_id: str, timeout_s: float, on_poll=None,
                 poll_s: float = 2.0) -> str:
        """Poll until the run ends; ``on_poll`` gets :meth:`task_instances` after each poll.

        A poll the API server does not answer in time (a busy machine: its workers share the
        CPUs with the run's Spark jobs) or refuses for a moment is retried at the next poll, up
        to ``timeout_s``; the run goes on regardless of whether anyone watches it.
        """
        deadline = time.monotonic() + timeout_s
        state = "queued"
        while time.monotonic() < deadline:
            try:
                state = self.run_state(dag_id, run_id)
                if on_poll:
                    on_poll(self.task_instances(dag_id, run_id))
            except (TimeoutError, ConnectionError, urllib.error.URLError) as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                    raise  # a wrong dag or run id: polling again will not help
                log.warning("polling %s run %s: %s; retrying", dag_id, run_id, exc)
            if state in TERMINAL:
                return state
            time.sleep(poll_s)
        raise TimeoutError(f"{dag_id} run {run_id} still {state} after {timeout_s}s")


def dag_test(dag_id: str, conf: dict) -> str:
    """Run one DAG in-process with ``dag.test()`` (no scheduler); return the run's final state.

    Needs the Airflow environment (:func:`airflow_env`) in ``os.environ`` before Airflow is
    imported, so call it in a fresh process: ``python -m tandem.ops.airflow_client DAG_ID
    CONF_JSON``.
    """
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    run = bag.dags[dag_id].test(run_conf=conf)
    return str(run.state)


if __name__ == "__main__":
    state = dag_test(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    print(json.dumps({"dag_id": sys.argv[1], "state": state}))
    raise SystemExit(0 if state == "success" else 1)
