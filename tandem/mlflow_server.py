"""Start and stop a real ``mlflow server`` (tracking + registry + proxied artifacts).

One process tree per server: SQLite backend store and a local artifact folder under one state dir,
bound to 127.0.0.1. Artifacts are *proxied* (``--serve-artifacts``): clients upload and download
through the server's HTTP API (``mlflow-artifacts:/``), so a client needs only the URL, not access
to the server's disk. The server forks uvicorn workers, so it runs in its own process group and
``stop()`` signals the whole group. The Huey job runner (GenAI jobs) is switched off: Tandem never
uses it and it costs ~8 processes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


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


def server_env() -> dict[str, str]:
    """The environment the server runs with: no telemetry, no Huey job runner."""
    env = dict(os.environ)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def server_command(root: Path, port: int, workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line; state under ``root`` (``mlflow.db``, ``artifacts/``)."""
    root = Path(root).resolve()
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination", (root / "artifacts").as_uri(),
        "--host", HOST, "--port", str(port), "--workers", str(workers),
    ]


def start_server(root: Path, port: int, timeout: float = 180.0, workers: int = 1) -> MlflowServer:
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
        proc = subprocess.Popen(server_command(root, port, workers), stdout=out,
                                stderr=subprocess.STDOUT, env=server_env(), cwd=root,
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
    """``python -m tandem.mlflow_server --root DIR --port N``: run a server until interrupted."""
    import argparse

    from tandem.config import Paths

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", type=Path, default=Paths.default().mlflow)
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    signal.signal(signal.SIGTERM, _exit)  # SIGINT already raises KeyboardInterrupt
    server = start_server(args.root, args.port)  # a signal while booting stops it too
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
