"""Start and stop a real ``mlflow server`` (tracking + registry + proxied artifacts).

One process tree per server: SQLite backend store and a local artifact folder under one state dir,
bound to 127.0.0.1. Artifacts are *proxied* (``--serve-artifacts``): clients upload and download
through the server's HTTP API (``mlflow-artifacts:/``), so a client needs only the URL, not access
to the server's disk. The server forks uvicorn workers, so it runs in its own process group and
``stop()`` signals the whole group. The Huey job runner (GenAI jobs) is switched off: Tandem never
uses it and it costs ~8 processes.

With ``auth=True`` the server runs MLflow's ``basic-auth`` app: every request but ``/health``
needs HTTP basic credentials. Its state lives under ``root/auth/``: ``basic_auth.ini`` (no secret:
the user store's SQLite URI, the admin's name, ``NO_PERMISSIONS`` for users an admin adds later),
and two secrets generated once, each in a file only its owner can read (mode 0600, like Airflow's
``simple_auth_manager_passwords.json.generated``): the admin password and the Flask secret key
(CSRF of the sign-up form). They reach the server through its environment
(``MLFLOW_AUTH_ADMIN_PASSWORD``, ``MLFLOW_FLASK_SERVER_SECRET_KEY``), never a command line, the ini
or a log line. MLflow creates the admin user on the first start against an empty user store and
ignores the password afterwards, so the file must stay with the store (rotate through MLflow's
update-password API, then rewrite the file). Clients authenticate with
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (:func:`client_env`). ``make demo``
runs its server this way unless ``TANDEM_MLFLOW_AUTH=0`` (:func:`auth_requested`).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tandem.security import read_secret_file

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
ADMIN_USER = "admin"
# a cheap read that needs credentials when auth is on (``/health`` never does)
ANONYMOUS_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


@dataclass
class MlflowServer:
    """A running server: ``url`` for clients, ``pid`` of the process-group leader."""

    url: str
    pid: int
    root: Path
    log_path: Path
    startup_s: float
    _proc: subprocess.Popen = field(repr=False)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after ``timeout``."""
        if self._proc.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("mlflow server %s ignored SIGTERM; killing its group", self.pid)
        # workers may outlive the leader; the group id is still the leader's pid
        _signal_group(self.pid, signal.SIGKILL)
        self._proc.wait(5)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class AuthFiles:
    """Where a server's basic-auth state lives (all under ``root/auth/``)."""

    config: Path
    password: Path
    secret_key: Path
    database: Path

    @classmethod
    def under(cls, root: Path) -> AuthFiles:
        auth = Path(root).resolve() / "auth"
        return cls(auth / "basic_auth.ini", auth / "admin_password.generated",
                   auth / "flask_secret_key.generated", auth / "users.db")


def ensure_auth(root: Path) -> AuthFiles:
    """Write the auth config and generate the two secrets, each only if missing (idempotent)."""
    files = AuthFiles.under(root)
    files.config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not files.config.exists():
        files.config.write_text(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{files.database}\n"
            f"admin_username = {ADMIN_USER}\n"
            "# the admin password is not here: it is generated into admin_password.generated\n"
            "# (mode 0600) and handed to the server as MLFLOW_AUTH_ADMIN_PASSWORD\n")
    for path in (files.password, files.secret_key):
        _write_new_secret(path)
    return files


def _write_new_secret(path: Path) -> None:
    """A fresh random secret into a new 0600 file; an existing file is kept as it is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24))


def client_env(root: Path) -> dict[str, str]:
    """The variables an MLflow client needs for the auth server under ``root`` (admin user).

    The password is read from its 0600 file (a readable-by-others file is refused).
    """
    files = AuthFiles.under(root)
    return {"MLFLOW_TRACKING_USERNAME": ADMIN_USER,
            "MLFLOW_TRACKING_PASSWORD": read_secret_file(files.password).decode()}


def auth_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the demo's embedded server runs basic auth: on unless ``TANDEM_MLFLOW_AUTH=0``."""
    return (os.environ if env is None else env).get("TANDEM_MLFLOW_AUTH", "1") != "0"


def refuses_anonymous(url: str, timeout: float = 180.0) -> bool:
    """Whether the server at ``url`` refuses a request without credentials (401: basic auth
    on) rather than answering it (200: open). Waits up to ``timeout`` for it to answer either
    way (it may still be booting), then raises ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}{ANONYMOUS_PROBE}", timeout=5) as resp:
                if resp.status == 200:
                    return False
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow at {url} answered neither 200 nor 401 in {timeout:.0f} s")
        time.sleep(0.5)


def server_env(root: Path | None = None, auth: bool = False) -> dict[str, str]:
    """The environment the server runs with: no telemetry, no Huey job runner; with ``auth``, the
    basic-auth config and secrets of ``root`` (made by :func:`ensure_auth` when missing)."""
    env = dict(os.environ)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    if auth:
        if root is None:
            raise ValueError("auth needs the server's state root")
        files = ensure_auth(root)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(files.config)
        env["MLFLOW_AUTH_ADMIN_USERNAME"] = ADMIN_USER
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = read_secret_file(files.password).decode()
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = read_secret_file(files.secret_key).decode()
    return env


def server_command(root: Path, port: int, workers: int = 1, auth: bool = False) -> list[str]:
    """The ``mlflow server`` command line; state under ``root`` (``mlflow.db``, ``artifacts/``).

    No secret is on it: with ``auth`` the basic-auth app reads them from :func:`server_env`.
    """
    root = Path(root).resolve()
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination", (root / "artifacts").as_uri(),
        "--host", HOST, "--port", str(port), "--workers", str(workers),
        *(["--app-name", "basic-auth"] if auth else []),
    ]


def start_server(root: Path, port: int, timeout: float = 180.0, workers: int = 1,
                 auth: bool = False) -> MlflowServer:
    """Start a server with its state under ``root`` and wait until ``/health`` answers 200.

    Parameters
    ----------
    root : Path
        State directory (created): ``mlflow.db``, ``artifacts/`` and ``server.log``.
    port : int
        Loopback port to bind (pick a free one, e.g. ``tests.conftest.free_port``).
    timeout : float
        Seconds to wait for ``/health``; on timeout (or early exit) the server is stopped and
        ``RuntimeError`` carries the tail of its log. Startup takes ~8 s on 2 idle cores and
        over a minute on a loaded shared machine, hence the generous default.
    workers : int
        uvicorn worker processes.
    auth : bool
        Run the ``basic-auth`` app (module docstring); clients then need :func:`client_env`.

    Returns
    -------
    MlflowServer
        Handle with ``url``, ``pid`` and ``stop()``.
    """
    root = Path(root).resolve()
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    log_path = root / "server.log"
    t0 = time.perf_counter()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(server_command(root, port, workers, auth), stdout=out,
                                stderr=subprocess.STDOUT, env=server_env(root, auth), cwd=root,
                                start_new_session=True)
    url = f"http://{HOST}:{port}"
    server = MlflowServer(url, proc.pid, root, log_path, 0.0, proc)
    try:
        _wait_healthy(url, proc, timeout)
    except BaseException as exc:
        server.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{exc}; server log tail:\n{tail}") from exc
    server.startup_s = time.perf_counter() - t0
    log.info("mlflow server up at %s in %.1f s (pid %d)", url, server.startup_s, proc.pid)
    return server


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server at {url} not healthy after {timeout:.0f} s")


def main() -> None:
    """``python -m tandem.ops.mlflow_server --root DIR --port N``: run a server until
    interrupted."""
    import argparse

    from tandem.config import Paths

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", type=Path, default=Paths.default().mlflow)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--auth", action="store_true",
                        help="basic auth (admin password: ROOT/auth/admin_password.generated)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    signal.signal(signal.SIGTERM, _exit)  # SIGINT already raises KeyboardInterrupt
    # a signal while booting stops it too
    server = start_server(args.root, args.port, auth=args.auth)
    print(server.url, flush=True)
    try:
        while True:
            signal.pause()
    finally:
        server.stop()


def _exit(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
