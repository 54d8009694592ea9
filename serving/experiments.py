"""Experiments in the serving process: hot definitions, shadow scoring, per-variant health.

* :class:`DefinitionsWatcher` re-reads ``experiments.json`` (``tandem.experiments.definitions``)
  when its modification time changes — the registry poller calls it — so a canary step or a
  rollback the DAG wrote is served within one poll, like a new champion.
* :class:`ShadowScorer`: a shadow variant's alias scores a sample of the same requests
  (``ServingConfig.shadow_sample``, every 1/sample-th answered request) OFF the hot path. The
  scorer shares the process's cores and GIL with live traffic, so scoring every request would
  double the CPU a request costs and, near capacity, the live tail with it; a 10 % sample still
  gives thousands of comparisons an hour. The request thread only ``put_nowait``s (query,
  config, served ids) into a bounded queue — when it
  is full the request is dropped and counted, never waited for — and one daemon worker answers
  it with the shadow engine, then records overlap@k (shared items / k), Kendall's tau of the
  shared items' ranks (-1..1; none when fewer than two are shared) and the shadow's latency as
  Prometheus histograms. The worker has its own circuit breaker, so a shadow never opens the
  live one.
* Per-variant latency and error metrics (``tandem_variant_seconds``,
  ``tandem_variant_errors_total``): what the canary's guardrails read.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import Counter, Histogram
from scipy.stats import kendalltau

from serving.breaker import CircuitBreaker
from serving.config import ServingConfig
from serving.metrics import _MS_BUCKETS
from serving.stores import OnlineStore
from serving.validation import RecommendQuery
from tandem.experiments import definitions as defs
from tandem.policy.ab import Experiment, Variant

log = logging.getLogger(__name__)
_UNIT = tuple(x / 10 for x in range(-10, 11))

VARIANT_SECONDS = Histogram("tandem_variant_seconds", "Recommend latency per A/B variant",
                            ["experiment", "variant"], buckets=_MS_BUCKETS)
VARIANT_ERRORS = Counter("tandem_variant_errors", "Recommend requests that raised, per variant",
                         ["experiment", "variant"])
SHADOW_SECONDS = Histogram("tandem_shadow_seconds", "Shadow engine latency (off the hot path)",
                           ["alias"], buckets=_MS_BUCKETS)
SHADOW_OVERLAP = Histogram("tandem_shadow_overlap", "overlap@k of shadow and served slates",
                           ["alias"], buckets=tuple(x / 10 for x in range(11)))
SHADOW_RANK_CORR = Histogram("tandem_shadow_rank_corr", "Kendall tau of shared items' ranks",
                             ["alias"], buckets=_UNIT)
SHADOW_DROPPED = Counter("tandem_shadow_dropped", "Shadow requests dropped (queue full)",
                         ["alias"])
SHADOW_FAILED = Counter("tandem_shadow_failed", "Shadow requests that raised", ["alias"])


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
    return float(kendalltau(a, b).statistic)


class ShadowScorer:
    """Bounded queue + one worker thread scoring requests with the shadow aliases' engines.

    ``engines`` is called on the worker for the current alias -> engine snapshot (the App's
    ``engines`` attribute, so hot reloads apply).
    """

    def __init__(self, engines: Callable[[], Mapping[str, object]], store: OnlineStore,
                 cfg: ServingConfig, maxsize: int = 256):
        self.engines, self.store = engines, store
        self.breaker = CircuitBreaker(None, cfg.store_breaker_failures,
                                      cfg.store_breaker_cooldown_s)
        self.aliases: tuple[str, ...] = ()
        self.sample = min(max(cfg.shadow_sample, 0.0), 1.0)
        self._seen = 0  # requests submitted; the n-th is scored when n x sample crosses an int
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._worker = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._worker.start()

    def submit(self, q: RecommendQuery, cfg: ServingConfig, served: list[str]) -> None:
        """Queue ``q`` for every shadow alias when it is in the sample; never blocks (drop and
        count when full). Concurrent request threads may race on the counter: the share is then
        approximate, never the latency."""
        self._seen += 1
        if int(self._seen * self.sample) == int((self._seen - 1) * self.sample):
            return
        for alias in self.aliases:
            try:
                self._queue.put_nowait((alias, q, cfg, served))
            except queue.Full:
                SHADOW_DROPPED.labels(alias).inc()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            alias, q, cfg, served = job
            try:
                self._score(alias, q, cfg, served)
            except Exception:  # noqa: BLE001 - a shadow failure is counted, never raised
                SHADOW_FAILED.labels(alias).inc()
                log.exception("shadow %s failed", alias)
            finally:
                self._queue.task_done()

    def _score(self, alias: str, q: RecommendQuery, cfg: ServingConfig,
               served: list[str]) -> None:
        engine = self.engines().get(alias)
        if engine is None:
            return
        t0 = time.perf_counter()
        result = engine.recommend(q, cfg, self.store, self.breaker)
        SHADOW_SECONDS.labels(alias).observe(time.perf_counter() - t0)
        SHADOW_OVERLAP.labels(alias).observe(overlap_at_k(served, result.item_ids, q.k))
        tau = rank_correlation(served, result.item_ids)
        if tau is not None and tau == tau:  # NaN when all ranks tie
            SHADOW_RANK_CORR.labels(alias).observe(tau)

    def join(self) -> None:
        """Wait until every queued request is scored (tests, benchmarks)."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)


class DefinitionsWatcher:
    """The active experiment of a definitions file; the file is re-parsed only when it changes
    (activity by start/end is re-evaluated on every poll)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._found: list[defs.Definition] = []

    def poll(self) -> defs.Definition | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            try:
                self._found = defs.load(self.path)
                self._stamp = stamp
            except (ValueError, KeyError, TypeError):  # half-edited by hand: keep the last
                log.exception("experiment definitions %s unreadable; keeping the last ones",
                              self.path)
        return defs.active(self._found, datetime.now(UTC))


class ExperimentRuntime:
    """The split serving applies now, its shadow aliases and their scorer.

    Without a watcher the split is the static ``experiment`` (``--experiment`` file or the
    champion alone). With one, :meth:`refresh` (called by the App's poller) follows the
    definitions file; no active experiment means everyone gets ``default``.
    """

    def __init__(self, experiment: Experiment, watcher: DefinitionsWatcher | None = None):
        self.default, self.watcher = experiment, watcher
        self.experiment, self.shadow_aliases = experiment, ()
        self.shadow: ShadowScorer | None = None

    def pending(self) -> tuple[Experiment, tuple[str, ...]] | None:
        """(split, shadow aliases) the definitions file asks for, when they differ from now."""
        if self.watcher is None:
            return None
        d = self.watcher.poll()
        want = (self.default, ()) if d is None else (d.to_ab(), d.shadow_aliases)
        return None if want == (self.experiment, self.shadow_aliases) else want

    def aliases(self, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.experiment.aliases, *self.shadow_aliases, *extra)))

    def apply(self, experiment: Experiment, shadow_aliases: tuple[str, ...],
              make_scorer: Callable[[], ShadowScorer]) -> None:
        """Swap the split (engines for its aliases must already be loaded)."""
        if shadow_aliases and self.shadow is None:
            self.shadow = make_scorer()
        if self.shadow is not None:
            self.shadow.aliases = shadow_aliases
        self.experiment, self.shadow_aliases = experiment, shadow_aliases
        log.info("experiment %s: variants %s, shadow %s", experiment.name,
                 {v.name: round(v.weight, 4) for v in experiment.variants}, shadow_aliases)

    def observe(self, variant: Variant, seconds: float, q: RecommendQuery,
                cfg: ServingConfig, served: list[str]) -> None:
        """After an answered request: its variant's latency; the shadow's copy queued."""
        _variant_seconds(self.experiment.name, variant.name).observe(seconds)
        if self.shadow is not None and self.shadow_aliases:
            self.shadow.submit(q, cfg, served)

    def failed(self, variant: Variant) -> None:
        VARIANT_ERRORS.labels(self.experiment.name, variant.name).inc()

    def close(self) -> None:
        if self.shadow is not None:
            self.shadow.close()


@functools.lru_cache(maxsize=256)
def _variant_seconds(experiment: str, variant: str):
    """The histogram child of one variant (``labels()`` locks; look it up once)."""
    return VARIANT_SECONDS.labels(experiment, variant)
