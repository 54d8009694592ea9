"""What both stream consumers share: client settings, durable writes, stop signals, stats.

Client settings follow the broker notes (../shared/notes/stack-feasibility.md, section 7): a
6 s session timeout with 1 s heartbeats (tansu holds a JoinGroup for about half the session
timeout, so kafka-python's 45 s default means a 23 s join), manual commits only, and a short fetch
wait so a quiet topic does not add 500 ms to freshness. The wait is the broker's whole budget for
a fetch, though: tansu on s3 storage lists a partition's stored batches on every fetch, which
soon takes longer than 50 ms, and then every fetch comes back empty (measured: 0 of 3,000
events consumed at 50 ms, all at 500 ms); ``TANDEM_KAFKA_FETCH_MAX_WAIT_MS`` raises it there.

Throughput needs the ``crc32c`` package (pinned in requirements.txt): without it kafka-python
computes the record-batch CRC32C in pure Python at ~8 MB/s, ~50 us per event in the producer and
again in each consumer, which alone kept the stream under 2,000 events/s on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from kafka import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from prometheus_client import Histogram

from tandem.config import Paths, kafka_bootstrap
from tandem.security import kafka_client_kwargs
from tandem.streaming.codec import now_ms
from tandem.streaming.topics import DLQ_TOPIC, EVENTS_TOPIC, ensure_topics

SESSION_TIMEOUT_MS = 6000
HEARTBEAT_MS = 1000
FETCH_MAX_WAIT_ENV = "TANDEM_KAFKA_FETCH_MAX_WAIT_MS"
T = TypeVar("T")
log = logging.getLogger(__name__)
FRESHNESS = Histogram(
    "tandem_stream_freshness_seconds",
    "Produce time -> visible downstream (landing file durable / online store pushed)",
    ["consumer"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


def make_consumer(bootstrap: str, group: str, topic: str,
                  listener: ConsumerRebalanceListener | None = None,
                  max_poll_records: int = 5000) -> KafkaConsumer:
    """A group member of ``topic`` with manual commits, starting from the earliest offset."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, client_id=f"{group}-{os.getpid()}",
        enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_MS,
        fetch_max_wait_ms=int(os.environ.get(FETCH_MAX_WAIT_ENV, "50")),
        max_poll_records=max_poll_records,
        max_partition_fetch_bytes=4 * 1024 * 1024, **kafka_client_kwargs())
    if listener is None:
        consumer.subscribe([topic])
    else:
        consumer.subscribe([topic], listener=listener)
    return consumer


def command_line(description: str, group: str) -> argparse.ArgumentParser:
    """The flags every consumer process takes; each consumer adds its own after these."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--home", type=Path, default=None, help="state root (TANDEM_HOME)")
    ap.add_argument("--bootstrap", default=None, help="broker (KAFKA_BOOTSTRAP_SERVERS)")
    ap.add_argument("--topic", default=EVENTS_TOPIC)
    ap.add_argument("--group", default=group)
    ap.add_argument("--stats", type=Path, default=None, help="write counts/freshness JSON here")
    ap.add_argument("--stats-window", type=int, default=200_000,
                    help="freshness percentiles over the last N records")
    return ap


def start_process(ap: argparse.ArgumentParser,
                  argv: list[str] | None) -> tuple[argparse.Namespace, Paths, str]:
    """Parse ``argv``, set up logging, resolve the state root and broker, create the topics."""
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    bootstrap = args.bootstrap or kafka_bootstrap()
    if not bootstrap:
        ap.error("--bootstrap or KAFKA_BOOTSTRAP_SERVERS is required")
    ensure_topics(bootstrap, names=(args.topic, DLQ_TOPIC))
    return args, paths, bootstrap


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, data: bytes) -> None:
    """Write ``path`` so that after a crash it is either absent or complete.

    Temp file in the same folder (a dot name, ignored by ``*.jsonl`` readers), fsync, rename over
    the target (atomic on POSIX), then fsync the folder so the rename itself survives a crash.
    """
    os.rename(_durable_temp(path, data), path)
    fsync_dir(path.parent)


def _durable_temp(path: Path, data: bytes) -> Path:
    """``data`` fsynced in a temp file next to ``path`` (a dot name, ignored by ``*.jsonl``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_once(path: Path, data: bytes) -> Path:
    """Write ``path`` durably like :func:`durable_write`, but never replace a file; return where
    ``data`` is.

    The complete temp file is hard-linked to the name, which fails atomically if the name exists.
    A file there with the same bytes is a replayed batch: kept, nothing written. A file with other
    bytes is a batch this name must not destroy: ``data`` lands next to it as
    ``<stem>.<sha256 prefix>.jsonl`` and a warning says so. Needs a POSIX filesystem (hard links).
    """
    tmp = _durable_temp(path, data)
    target = path
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            if path.read_bytes() == data:
                return path
            digest = hashlib.sha256(data).hexdigest()[:16]
            target = path.with_name(f"{path.stem}.{digest}{path.suffix}")
            log.warning("%s exists with other content: landing this batch as %s", path, target)
            with contextlib.suppress(FileExistsError):  # same digest: the same bytes, landed
                os.link(tmp, target)
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
    return target


class Stopping(Exception):  # noqa: N818 - a control-flow signal, not an error
    """A stop arrived while a consumer waited inside a batch: the batch is abandoned, neither
    saved nor committed, and the next start reads it again."""


class StopFlag:
    """Set by SIGTERM/SIGINT so a consumer finishes (or abandons) its batch, saves and exits.

    Create it first thing in a consumer process: a signal during start-up then stops the
    consumer at its first check instead of killing it halfway through.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: object) -> None:
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        """Raise :class:`Stopping` once the flag is set."""
        if self:
            raise Stopping("stop requested")

    def result(self, future: Future[T], step_s: float = 0.1) -> T:
        """``future``'s result, or :class:`Stopping` as soon as the flag is set while waiting."""
        while not future.done():
            self.check()
            wait([future], timeout=step_s)
        return future.result()


def in_daemon_thread(fn: Callable[..., T], *args: object) -> Future[T]:
    """Start ``fn(*args)`` in a daemon thread; its result as a future.

    Unlike a ``ThreadPoolExecutor`` worker, which the interpreter joins at exit, a daemon thread
    does not hold up a consumer that stops while ``fn`` is still running (e.g. importing Feast).
    """
    future: Future[T] = Future()

    def target() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=target, name=getattr(fn, "__name__", "background"),
                     daemon=True).start()
    return future


class StreamStats:
    """Counters and a freshness sample window, written as JSON for benches and ``make demo``.

    ``freshness_ms`` percentiles are over the last ``window`` events (a ring buffer), so a bench
    can read p50/p99 at steady state. The file is replaced atomically at most every ``every_s``.
    """

    def __init__(self, consumer: str, path: Path | None, window: int = 200_000,
                 every_s: float = 1.0) -> None:
        self.consumer = consumer
        self.path = path
        self.counts: dict[str, int] = {"records": 0}
        self.first_ms: int | None = None
        self.last_ms: int | None = None
        self._ring = np.zeros(window, dtype=np.float64)
        self._n = 0
        self._every_s = every_s
        self._written = 0.0
        self._hist = FRESHNESS.labels(consumer)

    def add(self, name: str, n: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def processed(self, produce_ms: np.ndarray, visible_ms: int) -> None:
        """``produce_ms`` (records,) record timestamps made visible at ``visible_ms``."""
        if produce_ms.size == 0:
            return
        lag_s = (visible_ms - produce_ms) / 1000.0
        for v in lag_s:
            self._hist.observe(v)
        idx = (self._n + np.arange(lag_s.size)) % self._ring.size
        self._ring[idx] = lag_s * 1000.0
        self._n += lag_s.size
        self.counts["records"] += int(produce_ms.size)
        self.first_ms = self.first_ms or visible_ms
        self.last_ms = visible_ms
        self.maybe_write()

    def snapshot(self) -> dict[str, Any]:
        window = self._ring[: min(self._n, self._ring.size)]
        p50, p99, pmax = (np.percentile(window, [50, 99, 100]).round(1).tolist()
                          if window.size else (None, None, None))
        return {"consumer": self.consumer, "pid": os.getpid(), "written_ms": now_ms(),
                "counts": self.counts, "first_visible_ms": self.first_ms,
                "last_visible_ms": self.last_ms,
                "freshness_ms": {"n": int(window.size), "p50": p50, "p99": p99, "max": pmax}}

    def maybe_write(self, force: bool = False) -> None:
        if self.path is None or (not force and time.monotonic() - self._written < self._every_s):
            return
        self._written = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.path.name}.tmp"
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, self.path)
