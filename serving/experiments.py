"""Experiments in the serving process: hot definitions, shadow scoring, per-variant health.

* :class:`DefinitionsWatcher` re-reads ``experiments.json`` (``tandem.experiments.definitions``)
  when its modification time changes — the registry poller calls it — so a canary step or a
  rollback the DAG wrote is served within one poll, like a new champion.
* :class:`ExperimentRuntime`: the split served now and its shadow aliases. A shadow variant's
  alias scores a sample of the same requests (``ServingConfig.shadow_sample``) OFF the hot path,
  in a child process (:mod:`serving.shadow`): the server never loads a shadow-only alias's
  engine, and the request thread only queues a small record without waiting.
* Per-variant latency and error metrics (``tandem_variant_seconds``,
  ``tandem_variant_errors_total``): what the canary's guardrails read.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import Counter, Histogram

from serving.metrics import _MS_BUCKETS
from serving.shadow import ShadowScorer
from serving.validation import RecommendQuery
from tandem.experiments import definitions as defs
from tandem.policy.ab import Experiment, Variant

log = logging.getLogger(__name__)

VARIANT_SECONDS = Histogram("tandem_variant_seconds", "Recommend latency per A/B variant",
                            ["experiment", "variant"], buckets=_MS_BUCKETS)
VARIANT_ERRORS = Counter("tandem_variant_errors", "Recommend requests that raised, per variant",
                         ["experiment", "variant"])


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
    champion alone). With one, :meth:`pending` (called by the App's poller) follows the
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
        """The aliases this process serves (shadow-only ones are the shadow child's)."""
        return tuple(dict.fromkeys((*self.experiment.aliases, *extra)))

    def apply(self, experiment: Experiment, shadow_aliases: tuple[str, ...],
              make_scorer: Callable[[tuple[str, ...]], ShadowScorer | None]) -> None:
        """Swap the split (engines for its aliases must already be loaded); a changed set of
        shadow aliases gets a new scorer (and child process)."""
        if shadow_aliases != self.shadow_aliases or (shadow_aliases and self.shadow is None):
            self.close()
            self.shadow = make_scorer(shadow_aliases) if shadow_aliases else None
        self.experiment, self.shadow_aliases = experiment, shadow_aliases
        log.info("experiment %s: variants %s, shadow %s", experiment.name,
                 {v.name: round(v.weight, 4) for v in experiment.variants}, shadow_aliases)

    def observe(self, variant: Variant, seconds: float, q: RecommendQuery,
                served: Sequence[str]) -> None:
        """After an answered request: its variant's latency; the shadow's copy queued."""
        _variant_seconds(self.experiment.name, variant.name).observe(seconds)
        shadow = self.shadow
        if shadow is not None:
            shadow.submit(q, variant.overrides, served)

    def failed(self, variant: Variant) -> None:
        VARIANT_ERRORS.labels(self.experiment.name, variant.name).inc()

    def close(self) -> None:
        """Stop the shadow child, if any."""
        shadow, self.shadow = self.shadow, None
        if shadow is not None:
            shadow.close()


@functools.lru_cache(maxsize=256)
def _variant_seconds(experiment: str, variant: str):
    """The histogram child of one variant (``labels()`` locks; look it up once)."""
    return VARIANT_SECONDS.labels(experiment, variant)
