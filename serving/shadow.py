"""Shadow scoring in its own process: a challenger scores a sample of live requests off the hot
path, on neither the live requests' GIL nor (when they need it) their cores.

Why a process: a scoring thread in the server shares its GIL and both cores of the bench box
with live requests. At a sustainable 50 QPS on the 1M-item bench world a thread scoring every
request moved the live p99 from 41 ms to 1.6 s; a 10 % sample still added 2.9 ms on the smaller
world. The child scores at nice :data:`NICE`, so when live requests want the cores the kernel
gives them first and the shadow takes what is left (the README has the numbers).

* Server side, :class:`ShadowScorer`: the request thread only ``put_nowait``s a small picklable
  record (the query, its variant's config overrides, the served ids) into a bounded
  ``multiprocessing`` queue; when it is full the request is dropped and counted, never waited
  for. A supervisor thread reads the child's results and records the Prometheus histograms
  (``tandem_shadow_seconds``, ``_overlap``, ``_rank_corr``) and counters (``_dropped_total``,
  ``_failed_total``).
* Child side, :func:`_child`: builds its own engines from a picklable :data:`ShadowSource`
  (the server passes its own command line, so the same bundle source and online store) and
  keeps them current like the server's App (the source starts its registry poller). The server
  no longer holds a shadow-only alias's engine.
* The child dying never touches serving: requests queued to it are lost (at most the queue's
  size), it is restarted after a back-off (``tandem_shadow_restarts_total``), and after
  ``max_restarts`` deaths within ``window_s`` shadowing stops with a logged reason
  (``tandem_shadow_up`` 0). ``close()`` stops it; a child whose server died exits on its own.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram
from scipy.stats import kendalltau

from serving.breaker import CircuitBreaker
from serving.config import ServingConfig
from serving.metrics import _MS_BUCKETS
from serving.validation import RecommendQuery

log = logging.getLogger(__name__)

# The child's niceness once its engines are loaded (it loads at the server's own priority, as
# the server's hot reloads do: niced, it took minutes to load on the shared 2-core box). Under
# contention the kernel gives a nice-10 process ~1/10 of a nice-0 one's share: live requests
# come first, and the shadow still makes progress on a busy host (19 gives it ~1/70).
NICE = 10
_UNIT = tuple(x / 10 for x in range(-10, 11))

SHADOW_SECONDS = Histogram("tandem_shadow_seconds", "Shadow engine latency (off the hot path)",
                           ["alias"], buckets=_MS_BUCKETS)
SHADOW_OVERLAP = Histogram("tandem_shadow_overlap", "overlap@k of shadow and served slates",
                           ["alias"], buckets=tuple(x / 10 for x in range(11)))
SHADOW_RANK_CORR = Histogram("tandem_shadow_rank_corr", "Kendall tau of shared items' ranks",
                             ["alias"], buckets=_UNIT)
SHADOW_DROPPED = Counter("tandem_shadow_dropped", "Shadow requests dropped (queue full)",
                         ["alias"])
SHADOW_FAILED = Counter("tandem_shadow_failed", "Shadow requests that raised", ["alias"])
SHADOW_RESTARTS = Counter("tandem_shadow_restarts", "Shadow child processes restarted after "
                          "they died")
SHADOW_UP = Gauge("tandem_shadow_up", "1 while a shadow child process scores, 0 otherwise")


class ShadowEngines(Protocol):
    """What the child scores with (a :class:`serving.app.App` is one)."""

    engines: Mapping[str, Any]
    store: Any
    cfg: ServingConfig

    def close(self) -> None: ...


# Picklable (a module-level function or a functools.partial of one): called IN THE CHILD with
# the shadow aliases; loads their engines (and keeps them current).
ShadowSource = Callable[[tuple[str, ...]], ShadowEngines]


def overlap_at_k(served: Sequence[str], shadow: Sequence[str], k: int) -> float:
    """Share of the top ``k`` both lists hold."""
    return len(set(served[:k]) & set(shadow[:k])) / k if k else 0.0


def rank_correlation(served: Sequence[str], shadow: Sequence[str]) -> float | None:
    """Kendall's tau between the ranks two lists give their shared items (None: < 2 shared)."""
    pos = {item: i for i, item in enumerate(shadow)}
    shared = [(i, pos[item]) for i, item in enumerate(served) if item in pos]
    if len(shared) < 2:
        return None
    a, b = zip(*shared, strict=True)
    tau = float(kendalltau(a, b).statistic)
    return None if tau != tau else tau  # NaN when all ranks tie


class _Child:
    """One child process and its two queues (fresh ones per start: a killed child may hold a
    queue's lock forever)."""

    def __init__(self, ctx, source: ShadowSource, aliases: tuple[str, ...], maxsize: int):
        self.requests = ctx.Queue(maxsize)
        self.results = ctx.Queue()
        self.proc = ctx.Process(target=_child, name="tandem-shadow", daemon=True,
                                args=(source, aliases, self.requests, self.results,
                                      os.getpid()))
        self.proc.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        try:
            self.requests.put_nowait(None)
        except (queue.Full, ValueError):
            pass
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        for q in (self.requests, self.results):
            q.cancel_join_thread()  # never wait on a dead reader at exit
            q.close()


class ShadowScorer:
    """A sample of requests scored by the shadow ``aliases`` in a child process.

    ``source`` builds the engines in the child (see :data:`ShadowSource`); ``cfg.shadow_sample``
    is the share of requests scored (every 1/sample-th).
    """

    def __init__(self, source: ShadowSource, cfg: ServingConfig, aliases: tuple[str, ...],
                 maxsize: int = 256, max_restarts: int = 3, window_s: float = 600.0):
        self.source, self.aliases, self.maxsize = source, tuple(aliases), maxsize
        self.sample = min(max(cfg.shadow_sample, 0.0), 1.0)
        self.max_restarts, self.window_s = max_restarts, window_s
        self.stopped_reason: str | None = None  # set once shadowing stopped for good
        self.last_error: str | None = None  # the child's last load failure
        self._seen = 0  # requests submitted; the n-th is scored when n x sample crosses an int
        self._queued = self._done = 0  # (request, alias) pairs queued / answered or lost
        self._deaths: deque[float] = deque()
        self._ctx = mp.get_context("spawn")  # no fork: the server holds threads, FAISS, Feast
        self._lock = threading.Lock()  # starting and stopping the child
        self._stop = threading.Event()
        self._child: _Child | None = _Child(self._ctx, source, self.aliases, maxsize)
        self._supervisor = threading.Thread(target=self._supervise, name="shadow-results",
                                            daemon=True)
        self._supervisor.start()

    @property
    def pid(self) -> int | None:
        """The child's process id (None once shadowing stopped)."""
        child = self._child
        return None if child is None else child.proc.pid

    def submit(self, q: RecommendQuery, overrides: Mapping[str, Any],
               served: Sequence[str]) -> None:
        """Queue ``q`` when it is in the sample; never blocks (drop and count when full).
        Concurrent request threads may race on the counter: the share is then approximate,
        never the latency."""
        self._seen += 1
        if int(self._seen * self.sample) == int((self._seen - 1) * self.sample):
            return
        child = self._child
        if child is None:
            return  # shadowing stopped (logged, tandem_shadow_up 0)
        try:
            child.requests.put_nowait((q, dict(overrides), list(served)))
            self._queued += len(self.aliases)
        except (queue.Full, ValueError):  # ValueError: the queue closed under a restart
            for alias in self.aliases:
                SHADOW_DROPPED.labels(alias).inc()

    def _supervise(self) -> None:
        """Record the child's results; restart it when it dies (bounded)."""
        while not self._stop.is_set():
            child = self._child
            if child is None:
                return
            try:
                self._record(child.results.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            except (EOFError, OSError, ValueError):  # closed by close() or a dead child
                if self._stop.is_set():
                    return
            if not child.proc.is_alive():
                self._restart(child, f"exit code {child.proc.exitcode}")

    def _record(self, msg: tuple) -> None:
        kind, alias, *rest = msg
        if kind == "scored":
            seconds, overlap, tau = rest
            SHADOW_SECONDS.labels(alias).observe(seconds)
            SHADOW_OVERLAP.labels(alias).observe(overlap)
            if tau is not None:
                SHADOW_RANK_CORR.labels(alias).observe(tau)
        elif kind == "failed":
            SHADOW_FAILED.labels(alias).inc()
        elif kind == "ready":
            SHADOW_UP.set(1)
            log.info("shadow child %s scores %s (versions %s)", self.pid, self.aliases, rest[0])
            return
        elif kind == "fatal":
            self.last_error = str(rest[0])
            log.error("shadow child could not load %s: %s", self.aliases, rest[0])
            return
        self._done += 1

    def _restart(self, dead: _Child, reason: str) -> None:
        SHADOW_UP.set(0)
        self._done = self._queued  # what the dead child held is lost
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.window_s:
            self._deaths.popleft()
        reason = f"{reason}; {self.last_error}" if self.last_error else reason
        with self._lock:
            if self._stop.is_set():
                return
            dead.stop(0)
            if len(self._deaths) > self.max_restarts:
                self._child, self.stopped_reason = None, reason
                log.error("shadow scoring of %s STOPPED: the child died %d times in %.0f s "
                          "(last: %s); serving is unaffected", self.aliases, len(self._deaths),
                          self.window_s, reason)
                return
        backoff = min(2.0 ** (len(self._deaths) - 1), 30.0)
        log.error("shadow child died (%s); restarting in %.0f s", reason, backoff)
        if self._stop.wait(backoff):
            return
        with self._lock:
            if not self._stop.is_set():
                self._child = _Child(self._ctx, self.source, self.aliases, self.maxsize)
                SHADOW_RESTARTS.inc()

    def join(self, timeout_s: float = 60.0) -> None:
        """Wait until every queued request is scored or lost (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while self._done < self._queued and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._done < self._queued:
            raise TimeoutError(f"shadow: {self._queued - self._done} requests unanswered")

    def close(self) -> None:
        """Stop the child (and the supervisor); no process is left behind."""
        self._stop.set()
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.stop()
        self._supervisor.join(timeout=5)
        SHADOW_UP.set(0)


def _child(source: ShadowSource, aliases: tuple[str, ...], requests, results,
           parent: int) -> None:
    """The shadow process: load the aliases' engines, then score what arrives until told to
    stop or the server is gone."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s shadow[%(process)d] %(name)s %(message)s")
    _one_thread()
    try:
        app = source(aliases)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which restarts or stops
        log.exception("shadow engines failed to load")
        results.put(("fatal", "", f"load failed: {exc!r}"[:500]))
        raise SystemExit(1) from exc
    os.nice(NICE)  # loaded at the server's priority (like its own reloads), scores below it
    results.put(("ready", "", {a: getattr(app.engines.get(a), "version", None)
                               for a in aliases}))
    breaker = CircuitBreaker(None, app.cfg.store_breaker_failures,
                             app.cfg.store_breaker_cooldown_s)
    try:
        while True:
            try:
                job = requests.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:  # the server is gone: no orphan
                    return
                continue
            if job is None:
                return
            q, overrides, served = job
            cfg = app.cfg.with_overrides(overrides)
            for alias in aliases:
                results.put(_score(app, alias, q, cfg, served, breaker))
    finally:
        app.close()


def _score(app: ShadowEngines, alias: str, q: RecommendQuery, cfg: ServingConfig,
           served: list[str], breaker: CircuitBreaker) -> tuple:
    """One result message: ("scored", alias, seconds, overlap@k, tau) or ("failed", alias)."""
    engine = app.engines.get(alias)
    try:
        if engine is None:
            raise LookupError(f"no engine for alias {alias!r}")
        t0 = time.perf_counter()
        result = engine.recommend(q, cfg, app.store, breaker)
        seconds = time.perf_counter() - t0
    except Exception:  # noqa: BLE001 - a shadow failure is counted, never raised
        log.exception("shadow %s failed", alias)
        return ("failed", alias)
    ids = list(result.item_ids)
    return ("scored", alias, seconds, overlap_at_k(served, ids, q.k),
            rank_correlation(served, ids))


def _one_thread() -> None:
    """One FAISS/BLAS thread, as in the server: the shadow never fans out over the cores."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(1)
