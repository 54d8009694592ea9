"""Keep a stream consumer running: restart it when it exits, with capped exponential backoff.

A consumer never dies on a record (poison records go to the dead-letter topic), but it still
exits on what it cannot work around: the broker or the online store unreachable past the client's
timeouts, a dead letter the broker did not acknowledge, a ``kill -9``. It then commits nothing, so
a restart resumes where it stopped. Without a supervisor nothing restarted it and the stream just
halted. The delay doubles from ``--backoff-s`` up to ``--max-backoff-s`` while the child keeps
dying, and starts over once a child has run ``--stable-s``.

Restarts are visible three ways: the Prometheus counter ``tandem_consumer_restarts_total
{consumer=...}`` (with ``tandem_consumer_up``) on ``--metrics-port``, a warning line in the log,
and a status JSON (``--status``) that ``make demo`` reads to print them.

SIGTERM/SIGINT stop the child (SIGTERM, so it commits and exits) and then the supervisor. The
child runs in the supervisor's process group, so ``make stop`` stops both.

Run: ``python -m tandem.streaming.supervisor --name landing-consumer --metrics-port 9109
--status var/run/landing-consumer.supervisor.json -- python -m tandem.streaming.landing_consumer``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

RESTARTS = Counter("tandem_consumer_restarts_total",
                   "Times a supervised stream consumer exited and was started again", ["consumer"])
UP = Gauge("tandem_consumer_up", "1 while the supervised consumer process runs", ["consumer"])


@dataclass
class Backoff:
    """Delays before a restart: ``initial_s`` doubling up to ``max_s``; a run of ``stable_s``
    or longer resets it (a crash a day is not a crash loop)."""

    initial_s: float = 1.0
    max_s: float = 60.0
    stable_s: float = 120.0
    _next_s: float = 0.0

    def after(self, ran_s: float) -> float:
        """The delay before restarting a child that ran ``ran_s`` seconds."""
        if ran_s >= self.stable_s or not self._next_s:
            self._next_s = self.initial_s
        delay, self._next_s = self._next_s, min(self._next_s * 2, self.max_s)
        return delay


class Supervisor:
    """Run ``argv`` (a list, never a shell string) until :meth:`stop`, restarting it on exit."""

    def __init__(self, name: str, argv: list[str], backoff: Backoff,
                 status_path: Path | None = None, grace_s: float = 20.0) -> None:
        self.name = name
        self.argv = argv
        self.backoff = backoff
        self.status_path = status_path
        self.grace_s = grace_s
        self.restarts = 0
        self.last_exit: int | None = None
        self.child: subprocess.Popen | None = None
        self._stop = threading.Event()
        UP.labels(name).set(0)
        RESTARTS.labels(name)  # exported as 0 from the start, so a rate() sees the first restart

    def stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        """Supervise until stopped; return the last child's exit code (0 if it never exited)."""
        while not self._stop.is_set():
            started = time.monotonic()
            self.child = subprocess.Popen(self.argv)
            UP.labels(self.name).set(1)
            self._write_status()
            while self.child.poll() is None:
                if self._stop.wait(0.2):
                    return self._stop_child()
            UP.labels(self.name).set(0)
            self.last_exit = self.child.returncode
            if self._stop.is_set():
                break
            delay = self.backoff.after(time.monotonic() - started)
            self.restarts += 1
            RESTARTS.labels(self.name).inc()
            log.warning("%s (pid %d) exited with code %s after %.1fs; restart #%d in %.1fs",
                        self.name, self.child.pid, self.last_exit, time.monotonic() - started,
                        self.restarts, delay)
            self._write_status()
            self._stop.wait(delay)
        return self.last_exit or 0

    def _stop_child(self) -> int:
        child = self.child
        assert child is not None
        child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs: SIGKILL", self.name, self.grace_s)
            child.kill()
            code = child.wait()
        UP.labels(self.name).set(0)
        self.last_exit = code
        self._write_status()
        return code

    def status(self) -> dict[str, Any]:
        return {"consumer": self.name, "pid": os.getpid(),
                "child_pid": self.child.pid if self.child else None,
                "restarts": self.restarts, "last_exit_code": self.last_exit,
                "written_ms": time.time_ns() // 1_000_000}

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.status_path.parent / f".{self.status_path.name}.tmp"
        tmp.write_text(json.dumps(self.status()))
        os.replace(tmp, self.status_path)


def read_status(path: Path) -> dict[str, Any] | None:
    """A supervisor's last status (None before it wrote one)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Restart a stream consumer whenever it exits.")
    ap.add_argument("--name", required=True, help="the consumer label of the metrics")
    ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus; 0 = off")
    ap.add_argument("--metrics-addr", default="127.0.0.1")
    ap.add_argument("--status", type=Path, default=None, help="write restart status JSON here")
    ap.add_argument("--backoff-s", type=float, default=1.0)
    ap.add_argument("--max-backoff-s", type=float, default=60.0)
    ap.add_argument("--stable-s", type=float, default=120.0)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the consumer's argv")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("the consumer's command line is missing (after --)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_addr)
    sup = Supervisor(args.name, command,
                     Backoff(args.backoff_s, args.max_backoff_s, args.stable_s), args.status)
    signal.signal(signal.SIGTERM, sup.stop)
    signal.signal(signal.SIGINT, sup.stop)
    raise SystemExit(sup.run())


if __name__ == "__main__":
    main()
