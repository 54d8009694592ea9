"""MLflow basic auth end to end: a real ``mlflow server --app-name basic-auth`` under a temp state
root, its admin password generated into a 0600 file, clients authenticated by the environment;
and the demo's start-up of it (on by default).
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tandem.config import Paths
from tandem.ops.mlflow_server import (
    ADMIN_USER,
    ANONYMOUS_PROBE,
    AuthFiles,
    auth_requested,
    client_env,
    ensure_auth,
)
from tandem.security import InsecureSecretFile
from tests.conftest import free_port, start_mlflow_server

SEARCH = ANONYMOUS_PROBE


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-auth"), auth=True)
    yield server
    server.stop()


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _group_command_lines(pgid: int) -> list[str]:
    """Command lines (as ``ps`` shows them to anyone) of every process in group ``pgid``."""
    lines = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) == pgid:
                lines.append((proc / "cmdline").read_bytes().decode(errors="replace"))
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return lines


@pytest.mark.mlflow
@pytest.mark.slow
def test_rest_refuses_requests_without_the_admin_password(auth_server):
    password = client_env(auth_server.root)["MLFLOW_TRACKING_PASSWORD"]
    assert _status(auth_server.url + "/health") == 200  # probes need no secret
    assert _status(auth_server.url + SEARCH) == 401
    assert _status(auth_server.url + SEARCH, ADMIN_USER, password + "x") == 401
    assert _status(auth_server.url + SEARCH, ADMIN_USER, password) == 200


@pytest.mark.mlflow
@pytest.mark.slow
def test_authenticated_client_logs_registers_and_aliases(auth_server, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tandem.ops.registry import MODEL_NAME, client_for, resolve_alias

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(auth_server.url).search_experiments()

    for key, value in client_env(auth_server.root).items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=auth_server.url, registry_uri=auth_server.url)
    experiment = client.create_experiment("auth-e2e")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "ndcg_at_10", 0.25)
    client.log_text(run.info.run_id, "flavors: {}\n", "model/MLmodel")  # proxied artifact upload
    client.set_terminated(run.info.run_id)
    client.create_registered_model(MODEL_NAME)
    version = client.create_model_version(MODEL_NAME, f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL_NAME, "champion", version.version)

    assert client.get_run(run.info.run_id).data.metrics == {"ndcg_at_10": 0.25}
    assert client.download_artifacts(run.info.run_id, "model/MLmodel")
    # serving's registry poller resolves aliases through tandem.ops.registry with the same env
    assert resolve_alias("champion", client=client_for(auth_server.url)) == int(version.version)


@pytest.mark.mlflow
@pytest.mark.slow
def test_secrets_are_0600_files_and_nowhere_else(auth_server):
    files = AuthFiles.under(auth_server.root)
    password = client_env(auth_server.root)["MLFLOW_TRACKING_PASSWORD"]
    secret_key = files.secret_key.read_text()
    assert len(password) >= 24
    for path in (files.password, files.secret_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert files.database.exists()  # the user store the ini points at
    command_lines = _group_command_lines(auth_server.pid)
    assert len(command_lines) >= 2  # the mlflow CLI and its uvicorn worker
    for text in (files.config.read_text(), auth_server.log_path.read_text(errors="replace"),
                 *command_lines):
        assert password not in text and secret_key not in text
    assert "Created admin user" in auth_server.log_path.read_text(errors="replace")


def test_ensure_auth_keeps_existing_secrets(tmp_path):
    files = ensure_auth(tmp_path)
    first = files.password.read_bytes(), files.secret_key.read_bytes(), files.config.read_text()
    ensure_auth(tmp_path)
    assert (files.password.read_bytes(), files.secret_key.read_bytes(),
            files.config.read_text()) == first
    assert first[0] != first[1]
    os.chmod(files.password, 0o644)
    with pytest.raises(InsecureSecretFile):
        client_env(tmp_path)


def test_the_demo_turns_auth_on_unless_told_not_to():
    assert auth_requested({})
    assert auth_requested({"TANDEM_MLFLOW_AUTH": "1"})
    assert not auth_requested({"TANDEM_MLFLOW_AUTH": "0"})


@pytest.mark.mlflow
@pytest.mark.slow
def test_the_demos_mlflow_refuses_anonymous_requests_and_admits_its_clients(tmp_path,
                                                                             monkeypatch):
    """``make demo``'s MLflow start-up (``tandem.cli.demo.start_mlflow``, nothing set): anonymous
    requests get 401; the demo process and a child started the way the demo starts serving,
    Airflow and through it the jobs (``processes.child_env`` of the stack's environment) get in
    through the environment; the password is on no command line, in no pid file, no log."""
    from tandem.cli.demo import Stack, start_mlflow
    from tandem.ops import processes

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "TANDEM_MLFLOW_AUTH"):
        monkeypatch.setenv(key, "")  # so that monkeypatch removes what the demo sets
        monkeypatch.delenv(key)
    paths = Paths(tmp_path / "tandem")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        assert start_mlflow(paths, port)
        password = client_env(paths.mlflow)["MLFLOW_TRACKING_PASSWORD"]
        assert _status(url + SEARCH) == 401
        assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) \
            == (ADMIN_USER, password)
        child = ("import sys; from mlflow import MlflowClient; "
                 "print(MlflowClient(sys.argv[1]).create_experiment('from-a-demo-child'))")
        done = subprocess.run([sys.executable, "-c", child, url], capture_output=True,
                              env=processes.child_env(Stack(paths, "127.0.0.1:1", url).env()),
                              timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert done.stdout.strip().isdigit()
        server = processes.running(paths.run, "mlflow")
        assert server is not None
        texts = [f.read_text(errors="replace") for f in (*paths.run.glob("*.pid.json"),
                                                          *paths.run.glob("*.log"))]
        texts += _group_command_lines(server.pid)
        assert len(texts) >= 4  # pid file, log, the mlflow CLI and its uvicorn worker
        assert not [t for t in texts if password in t]
    finally:
        processes.stop(paths.run, "mlflow")
