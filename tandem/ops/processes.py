"""Start long-running services detached, remember them by pid file, stop them by process group.

``make demo`` starts the broker, MLflow, Airflow, the stream consumers and the gRPC server through
:func:`start`; ``make stop`` calls :func:`stop_all`. Every service is started in its own session
(process group) so stopping kills its children too — Airflow's LocalExecutor workers ignore SIGTERM
(../shared/notes/stack-feasibility.md), hence SIGTERM, a grace period, then SIGKILL to the group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Service:
    name: str
    pid: int
    log: Path


def _pidfile(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid.json"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` + ``extra`` for a child process, minus the metrics folder Feast made here.

    Importing feast (``feast.metrics``) points ``PROMETHEUS_MULTIPROCESS_DIR`` and
    ``PROMETHEUS_MULTIPROC_DIR`` at a temp folder that it deletes when THIS process exits. A
    long-lived child that inherited them (Airflow and its tasks, serving, the consumers) outlives
    the folder and fails on the next metric it creates (``FileNotFoundError
    .../gauge_liveall_*.db``). A folder the user set (not Feast's own) is passed on.
    """
    env = {**os.environ, **(extra or {})}
    feast_metrics = sys.modules.get("feast.metrics")
    if feast_metrics is not None and getattr(feast_metrics, "_owns_mp_dir", False):
        owned = getattr(feast_metrics, "_prometheus_mp_dir", None)
        for key in ("PROMETHEUS_MULTIPROCESS_DIR", "PROMETHEUS_MULTIPROC_DIR"):
            if owned and env.get(key) == owned:
                del env[key]
    return env


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(run_dir: Path, name: str) -> Service | None:
    """The service recorded under ``name`` if its process is still alive."""
    path = _pidfile(run_dir, name)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not alive(data["pid"]):
        path.unlink(missing_ok=True)
        return None
    return Service(name, data["pid"], Path(data["log"]))


def start(run_dir: Path, name: str, argv: list[str], env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Service:
    """Start ``argv`` detached (own session, SIGINT default), log to ``run_dir/<name>.log``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = running(run_dir, name)
    if existing:
        return existing
    log = run_dir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=child_env(env), cwd=cwd, start_new_session=True,
            # a child of a non-interactive shell inherits SIGINT=ignored; restore the default
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    _pidfile(run_dir, name).write_text(json.dumps({"pid": proc.pid, "log": str(log),
                                                   "argv": argv, "started": time.time()}))
    return Service(name, proc.pid, log)


def stop(run_dir: Path, name: str, grace_s: float = 10.0) -> bool:
    """SIGTERM the service's process group, wait ``grace_s``, then SIGKILL what is left."""
    svc = running(run_dir, name)
    _pidfile(run_dir, name).unlink(missing_ok=True)
    if svc is None:
        return False
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            os.killpg(svc.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + grace_s / 2
        while time.monotonic() < deadline:
            if not _group_alive(svc.pid):
                return True
            time.sleep(0.2)
    try:
        os.killpg(svc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_all(run_dir: Path) -> list[str]:
    """Stop every service with a pid file under ``run_dir``, newest first."""
    if not run_dir.exists():
        return []
    files = sorted(run_dir.glob("*.pid.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    stopped = []
    for path in files:
        name = path.name.removesuffix(".pid.json")
        if stop(run_dir, name):
            stopped.append(name)
    return stopped
