"""Prometheus metrics of the serving process (one set per process, shared by all engines).

Scrape ``http://<host>:<metrics-port>/metrics``. Stage names match ``Engine`` stages
(``online_store``, ``user_tower``, ``ann``, ``merge``, ``features``, ``ranker``, ``mmr``,
``cold_start``, ``similar``); fallback reasons match the response's ``fallbacks`` field.
"""

from __future__ import annotations

import functools
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_MS_BUCKETS = tuple(x / 1000.0 for x in (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 25, 35,
                                         50, 75, 100, 250, 500, 1000))

REQUEST_SECONDS = Histogram("tandem_request_seconds", "RPC latency inside the servicer",
                            ["method"], buckets=_MS_BUCKETS)
STAGE_SECONDS = Histogram("tandem_stage_seconds", "Latency of one request stage", ["stage"],
                          buckets=_MS_BUCKETS)
REQUESTS = Counter("tandem_requests_total", "RPCs answered, by status code", ["method", "code"])
CANDIDATES = Counter("tandem_candidates_total", "Retrieved candidates, by source", ["source"])
POOL_SIZE = Histogram("tandem_candidate_pool_size", "Deduplicated candidates ranked per request",
                      buckets=(0, 50, 100, 200, 400, 600, 800, 1000, 1500))
FALLBACKS = Counter("tandem_fallbacks_total", "Degraded answers, by reason", ["reason"])
VARIANTS = Counter("tandem_variant_requests_total", "Recommend requests per A/B variant",
                   ["experiment", "variant"])
MODEL_VERSION = Gauge("tandem_model_version", "Registry version served per alias", ["alias"])
RELOADS = Counter("tandem_reloads_total", "Bundle (re)loads, by outcome", ["alias", "outcome"])
COLD_START = Counter("tandem_cold_start_total", "Recommend requests served by the cold path")
BREAKER_STATE = Gauge("tandem_breaker_state",
                      "Circuit breaker state: 0 closed, 1 half-open, 2 open", ["dependency"])
BREAKER_TRANSITIONS = Counter("tandem_breaker_transitions_total",
                              "Circuit breaker state changes, by the state entered",
                              ["dependency", "state"])
SHED = Counter("tandem_shed_total", "RPCs refused before any work, by reason "
               "(deadline: the client's deadline left no time)", ["method", "reason"])
BUNDLE_REJECTED = Counter("tandem_bundle_rejected_total",
                          "Registry versions refused and remembered as bad, by reason",
                          ["alias", "reason"])
LAST_GOOD = Gauge("tandem_serving_last_good", "1 while an alias serves its last good local "
                  "bundle because the registry was unreachable at start", ["alias"])

CACHE_LOOKUPS = Counter("tandem_cache_lookups_total", "Lookups of the serving caches "
                        "(serving.caches), by cache and outcome (hit, miss)", ["cache", "outcome"])
PATH_SECONDS = Histogram("tandem_recommend_path_seconds", "Recommend latency inside the "
                         "servicer by the path that answered it (precomputed: a stored feed; "
                         "cached: a cached cold-start pool; computed)", ["path"],
                         buckets=_MS_BUCKETS)


def serve(port: int, addr: str = "127.0.0.1") -> int:
    """Start the ``/metrics`` HTTP endpoint in a daemon thread; returns the port."""
    start_http_server(port, addr=addr)
    return port


class Observed(Protocol):
    """What :func:`observe` reads of an answered request (``serving.result.Result``)."""

    stages_ms: dict[str, float]
    candidates: dict[str, int]
    pool_size: int
    fallbacks: list[str]
    cold_start: bool


def observe(result: Observed) -> None:
    """Record one answered request: stage latencies (summed per stage), the pool's candidates
    per source and its size, fallbacks, cold start.

    The engine only fills the result; recording here, once per served request, keeps the
    server's warm-up requests (``Engine.warm_up``) out of every metric.
    """
    for stage, ms in result.stages_ms.items():
        _stage(stage).observe(ms / 1000.0)
    if result.candidates:  # a ranked answer (cold start and fallbacks have no pool)
        for source, count in result.candidates.items():
            if count:
                _candidates(source).inc(count)
        POOL_SIZE.observe(result.pool_size)
    for reason in result.fallbacks:
        FALLBACKS.labels(reason).inc()
    if result.cold_start:
        COLD_START.inc()


@functools.lru_cache(maxsize=64)
def _stage(name: str):
    """The ``tandem_stage_seconds`` child of one stage (``labels()`` locks; look it up once)."""
    return STAGE_SECONDS.labels(name)


@functools.lru_cache(maxsize=64)
def path(name: str):
    """The ``tandem_recommend_path_seconds`` child of one path."""
    return PATH_SECONDS.labels(name)


@functools.lru_cache(maxsize=64)
def _candidates(source: str):
    return CANDIDATES.labels(source)
