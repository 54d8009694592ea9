"""The serving application: immutable ``Engine`` snapshots of a bundle, swapped atomically.

``App`` holds one ``Engine`` (``serving.engine``) per registry alias that the A/B experiment
serves. A request reads ``app.engines`` ONCE and keeps that snapshot to the end, so a hot reload
(a background poller builds the new engine, then replaces the dict in one assignment) never
disturbs in-flight requests and never fails one. A new engine is swapped in only after a warm-up
without part fallbacks; refused versions and the last good one are kept in a
``serving.bundle_sync`` ledger. A swapped-out engine is freed once its last request ends
(nothing else refers to it).

The request path itself (stages, fallbacks, cold start) is described in ``serving.engine``; the
online stores are in ``serving.stores``, the ranker model in ``serving.ranker_model``, the item
feature table in ``serving.item_table``, the knobs in ``serving.config``.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from serving import item_deltas
from serving import metrics as m
from serving.breaker import CircuitBreaker
from serving.bundle_sync import BundleLedger, BundleRejected
from serving.config import ServingConfig
from serving.engine import Engine
from serving.experiments import DefinitionsWatcher, ExperimentRuntime
from serving.item_table import ItemFeatures, ItemTableFactory
from serving.ranker_model import Ranker
from serving.result import Result
from serving.shadow import ShadowScorer, ShadowSource
from serving.stores import FeastStore, MemoryStore, NoStore, OnlineStore, UserRows
from serving.validation import RecommendQuery
from tandem.data.impressions import Feed, ImpressionSink, NullSink
from tandem.policy.ab import Experiment, Variant

# what callers build an App from, importable from here as before the split
__all__ = ["App", "Engine", "FeastStore", "ItemFeatures", "MemoryStore", "NoStore",
           "OnlineStore", "Ranker", "Result", "ServingConfig", "UserRows"]

log = logging.getLogger(__name__)


def _freeze_heap(collect: bool) -> None:
    """Move everything allocated so far (the loaded engines) out of the cyclic GC's reach.

    A full collection walks every tracked object: with the benchmark's 1M-item bundle loaded
    one took ~260 ms, stalling every in-flight request. Python starts one once the objects
    promoted since the last one reach a quarter of the long-lived heap, which a hot reload's
    new engine does at once. The engines are immutable and freed by reference counting when
    swapped out, so the collector never needs to look at them (``gc.freeze``). ``collect``
    first drops the loading garbage (at start-up, before any request).
    """
    if collect:
        gc.collect()
    gc.freeze()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic collection while an engine loads (reference counting still frees).

    Building an engine of the 1M-item bench bundle in a running server started 8 full
    collections (190 ms in all, up to 47 ms each, with the GIL held): during a hot reload each
    one stalls every in-flight request. Paused: none. The engine is frozen out of the
    collector's reach right after (``_freeze_heap``).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


BundleSource = Callable[[str], tuple[Path, str]]  # alias -> (bundle dir, version)
VersionProbe = Callable[[str], str | None]  # alias -> current version (cheap)


class App:
    """Engines per alias, A/B assignment, hot reload and the impression hook.

    Parameters
    ----------
    fetch_bundle : alias -> (local bundle dir, version); called on start and on each change
    probe_version : alias -> version the alias points at now (None: unknown, keep serving)
    experiment : the A/B split; its variants' aliases are loaded
    store : per-request online store; sink : impression hook (default drops)
    engine_cls : the Engine class (the benchmark's naive baseline subclasses it)
    item_features : catalog ids -> item feature table (the fast path); default: item rows
        from the bundle only (created_at), everything else at its default
    ledger : last good / refused versions per alias (:mod:`serving.bundle_sync`); default in
        memory only
    definitions : follow an experiment definitions file (``serving.experiments``): its active
        split replaces ``experiment`` and its shadow aliases score off the hot path
    shadow_source : builds the shadow aliases' engines in the shadow child process
        (:mod:`serving.shadow`; picklable); None: shadow variants are not scored (logged)

    A bundle serves only after a warm-up without part fallbacks (``PART_FALLBACKS``); one that
    fails to fetch, load or warm up is refused and remembered (``BundleRejected``), and the
    old engine keeps serving. At start, an alias whose bundle cannot be fetched (registry down)
    or is refused serves its last good bundle from the ledger; polling syncs it later.
    """

    def __init__(self, fetch_bundle: BundleSource, probe_version: VersionProbe,
                 experiment: Experiment | None = None, cfg: ServingConfig | None = None,
                 store: OnlineStore | None = None, sink: ImpressionSink | None = None,
                 item_features: ItemTableFactory | None = None,
                 cache_dir: Path | None = None, engine_cls: type[Engine] = Engine,
                 ledger: BundleLedger | None = None,
                 definitions: DefinitionsWatcher | None = None,
                 shadow_source: ShadowSource | None = None):
        self.fetch_bundle, self.probe_version = fetch_bundle, probe_version
        self.runtime = ExperimentRuntime(experiment or Experiment.single(), definitions)
        self.cfg = cfg or ServingConfig()
        self.store = store or NoStore()
        self.breaker = CircuitBreaker("online_store", self.cfg.store_breaker_failures,
                                      self.cfg.store_breaker_cooldown_s)
        self.sink = sink or NullSink()
        self.item_features = item_features
        self.cache_dir = cache_dir
        self.engine_cls = engine_cls
        self.ledger = ledger or BundleLedger(None)
        self.engines: dict[str, Engine] = {}
        self.shadow_source = shadow_source
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._sync_experiment(self._start)
        for alias in self.runtime.aliases():
            if alias not in self.engines:
                self.engines = {**self.engines, alias: self._start(alias)}
        _freeze_heap(collect=True)

    @property
    def experiment(self) -> Experiment:
        return self.runtime.experiment

    def _sync_experiment(self, load: Callable[[str], Engine]) -> None:
        """Apply a changed definitions file: load the aliases it adds, then swap the split."""
        want = self.runtime.pending()
        if want is None:
            return
        try:
            added = {a: load(a) for a in self.runtime.aliases(want[0].aliases)
                     if a not in self.engines}
        except Exception:  # noqa: BLE001 - the old split keeps serving; retried next poll
            log.exception("experiment %s: an alias failed to load", want[0].name)
            return
        self.engines = {**self.engines, **added}
        self.runtime.apply(*want, self._shadow_scorer)

    def _shadow_scorer(self, aliases: tuple[str, ...]) -> ShadowScorer | None:
        if self.shadow_source is None:
            log.warning("shadow aliases %s: no shadow source, not scored", aliases)
            return None
        return ShadowScorer(self.shadow_source, self.cfg, aliases)

    def _start(self, alias: str) -> Engine:
        """The alias's registry bundle, else its last good one (registry down, or refused)."""
        try:
            version = self.probe_version(alias)
            reason = None if version is None else self.ledger.is_bad(alias, str(version))
            if reason is not None:  # refused by an earlier run: not fetched again
                raise LookupError(f"version {version} was refused before ({reason})")
            return self._build(alias)
        except Exception as exc:  # noqa: BLE001 - any failure: try the last good bundle
            if isinstance(exc, BundleRejected):
                self._reject(alias, exc)
            last = self.ledger.last_good(alias)
            if last is None:
                raise
            log.warning("alias %s: %s; serving the last good bundle v%s until the registry "
                        "syncs", alias, exc, last[1])
            m.LAST_GOOD.labels(alias).set(1)
            return self._load(alias, *last)

    def _build(self, alias: str) -> Engine:
        """Fetch, load and warm up the alias's current bundle (``BundleRejected`` if bad)."""
        bundle_dir, version = self.fetch_bundle(alias)
        engine = self._load(alias, bundle_dir, version)
        m.LAST_GOOD.labels(alias).set(0)
        return engine

    def _load(self, alias: str, bundle_dir: Path, version: str) -> Engine:
        t0 = time.perf_counter()
        try:
            with _gc_paused():
                engine = self.engine_cls(bundle_dir, version, self.item_features, self.cfg,
                                         self.cache_dir)
            loaded = time.perf_counter()
            # its own breaker: a store down during warm-up must not open the live one
            warm = engine.warm_up(self.cfg, self.store, breaker=CircuitBreaker(
                None, self.cfg.store_breaker_failures, self.cfg.store_breaker_cooldown_s))
        except Exception as exc:  # noqa: BLE001 - a part that fails to load refuses the bundle
            log.exception("alias %s: version %s failed to load", alias, version)
            raise BundleRejected(version, f"load failed: {exc!r}"[:500]) from exc
        if warm.part_failures:
            raise BundleRejected(version, f"warm-up fell back: {warm.part_failures}")
        self.ledger.mark_good(alias, version, bundle_dir)
        m.MODEL_VERSION.labels(alias).set(float(version) if str(version).isdigit() else -1)
        m.RELOADS.labels(alias, "loaded").inc()
        log.info("alias %s: loaded version %s from %s in %.1f s (ranker %s), %d warm-up "
                 "requests in %.1f s (fallbacks %s)", alias, version, bundle_dir, loaded - t0,
                 engine.ranker.backend, warm.requests, time.perf_counter() - loaded,
                 warm.fallbacks or "none")
        return engine

    def _reject(self, alias: str, exc: BundleRejected) -> None:
        log.error("alias %s: REFUSED version %s (%s); not fetched again while the alias points "
                  "at it", alias, exc.version, exc.reason)
        self.ledger.mark_bad(alias, exc.version, exc.reason)
        m.BUNDLE_REJECTED.labels(alias, exc.reason.split(":")[0]).inc()
        m.RELOADS.labels(alias, "rejected").inc()

    # ------------------------------------------------------------------------- requests
    def recommend(self, q: RecommendQuery, budget_ms: float | None = None) -> Result:
        """Answer ``q``; ``budget_ms``: time left before the client's deadline (stage
        deadlines shrink to fit it, see :meth:`ServingConfig.within`)."""
        variant = self.experiment.assign(q.user_id)
        engines = self.engines  # one snapshot for the whole request
        cfg = self.cfg.with_overrides(variant.overrides)
        t0 = time.perf_counter()
        try:
            result = engines[variant.alias].recommend(q, cfg.within(budget_ms), self.store,
                                                      self.breaker)
        except Exception:
            self.runtime.failed(variant)
            raise
        self.runtime.observe(variant, time.perf_counter() - t0, q, result.item_ids)
        result.experiment, result.variant = self.experiment.name, variant.name
        m.VARIANTS.labels(self.experiment.name, variant.name).inc()
        m.observe(result)
        self._log(q, result)
        return result

    def similar(self, item_id: str, k: int) -> Result | None:
        result = self.engines[self.experiment.variants[0].alias].similar(item_id, k)
        if result is not None:
            m.observe(result)
        return result

    def _log(self, q: RecommendQuery, result: Result) -> None:
        try:
            self.sink.log(Feed(result.request_id, q.user_id, q.ts or int(time.time() * 1000),
                               result.item_ids, [float(p) for p in result.propensities],
                               result.model_version, result.experiment, result.variant,
                               q.device or None, q.country or None, q.surface or None,
                               result.logged))
        except Exception:  # noqa: BLE001 - logging never fails a request
            log.exception("impression sink failed")

    def variant_of(self, user_id: str) -> Variant:
        return self.experiment.assign(user_id)

    # ------------------------------------------------------------------------- hot reload
    def poll_once(self) -> list[str]:
        """Reload every alias whose version moved, or whose bundle has a newer item delta
        (``serving.item_deltas``); returns the aliases swapped."""
        swapped = []
        self._sync_experiment(self._build)  # a changed experiment file first (its new aliases)
        for alias in self.runtime.aliases():
            try:
                version = self.probe_version(alias)
                current = self.engines.get(alias)
                if version is None or (current is not None and current.version == str(version)):
                    if current is None or not item_deltas.moved(current, self.cfg.deltas_dir):
                        continue
                    # new items since the build: the same bundle folder again, with the delta
                    try:
                        engine = self._load(alias, current.bundle_dir, current.version)
                    except BundleRejected as exc:  # the version is fine: not marked bad
                        log.error("alias %s: version %s with its new items failed (%s); still "
                                  "serving it without them", alias, current.version, exc.reason)
                        continue
                elif self.ledger.is_bad(alias, str(version)) is not None:
                    continue  # refused before: not fetched again until the alias moves
                else:
                    engine = self._build(alias)
            except BundleRejected as exc:  # the old engine keeps serving
                self._reject(alias, exc)
                continue
            except ConnectionError as exc:  # registry down (RegistryUnavailable): one line
                log.warning("alias %s: %s; still serving version %s", alias, exc,
                            getattr(self.engines.get(alias), "version", None))
                m.RELOADS.labels(alias, "unreachable").inc()
                continue
            except Exception:  # noqa: BLE001 - registry or network: retried next poll
                log.exception("reload of alias %s failed; still serving the old bundle", alias)
                m.RELOADS.labels(alias, "failed").inc()
                continue
            self.engines = {**self.engines, alias: engine}  # atomic swap
            swapped.append(alias)
        if swapped:
            _freeze_heap(collect=False)  # a collection here would stall requests
        return swapped

    def start_polling(self, interval_s: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.poll_once()

        self._poller = threading.Thread(target=loop, name="registry-poller", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        self.runtime.close()
        self.sink.close()
