"""The gRPC server process: ``python -m serving.server --alias champion --port 50051``.

``create_server(address, app)`` returns ``(server, port)`` (bind ``127.0.0.1:0`` in tests).
Health checking (``grpc.health.v1``, non-blocking) and server reflection are set up together in
``_configure_maintenance``, so ``grpcurl -plaintext host:port list`` and
``grpc_health_probe`` work. Shutdown marks every service NOT_SERVING first (load balancers stop
sending), then ``server.stop(grace)`` lets in-flight RPCs finish.

Bundles come from the MLflow registry by alias (``--alias``, default ``champion``; the
A/B experiment file may name more) and are re-checked every ``--poll-s`` seconds; ``--bundle-dir``
serves one local folder instead (no reload). Downloads and the ledger of the last good and
refused versions live in ``--cache-dir`` (default ``$TANDEM_HOME/serving/bundles``), so a
restart while the registry is down serves the last good bundle (``serving.bundle_sync``).

Overload is shed: beyond ``--max-concurrent-rpcs`` RPCs in flight (running or queued for a
worker) gRPC answers ``RESOURCE_EXHAUSTED`` at once (``tandem_shed_total{reason="overload"}``)
instead of queueing requests that would miss their deadlines anyway.

Access (``serving.auth``): TLS with ``--tls-cert``/``--tls-key``, mutual TLS with
``--tls-client-ca``, a bearer token from ``TANDEM_GRPC_TOKEN``/``TANDEM_GRPC_TOKEN_FILE``;
without them the server is plaintext (the demo, on loopback). Health stays open.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread per request; requests run side by side

import argparse  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
from concurrent import futures  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402

from serving import metrics  # noqa: E402
from serving.app import App  # noqa: E402
from serving.auth import Access  # noqa: E402
from serving.bundle_sync import (  # noqa: E402
    SHARED_DOWNLOADS,
    BundleLedger,
    BundleRejected,
    fetch_once,
)
from serving.config import ServingConfig  # noqa: E402
from serving.experiments import DefinitionsWatcher  # noqa: E402
from serving.servicer import RecommenderServicer  # noqa: E402
from serving.stores import FeastStore  # noqa: E402
from tandem.config import Paths  # noqa: E402
from tandem.contracts import recommender_v1_pb2 as pb  # noqa: E402
from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc  # noqa: E402
from tandem.models.bundle import DELTAS, BundleManifest  # noqa: E402
from tandem.policy.ab import Experiment, Variant  # noqa: E402
from tandem.policy.diversify import SIMILARITIES  # noqa: E402

log = logging.getLogger("serving")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
_HEALTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # server -> its health servicer


def _configure_maintenance(server: grpc.Server) -> health.HealthServicer:
    """Health (overall and per service, SERVING) and reflection over every service served."""
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names, server)
    return health_servicer


class _ShedCounter(grpc.ServerInterceptor):
    """Counts the RPCs gRPC refuses with RESOURCE_EXHAUSTED (``maximum_concurrent_rpcs``).

    gRPC refuses them in its polling thread without calling any handler; it calls the
    interceptors first, under the same lock and after taking the decision from the same two
    numbers read here (grpc/_server.py ``_process_event_and_continue``), so the count is exact.
    The numbers are private to grpc: if a release renames them this counts nothing (the
    shedding itself does not depend on it).
    """

    def __init__(self):
        self.state = None  # the server's private state, set once the server exists

    def intercept_service(self, continuation, handler_call_details):
        state = self.state
        limit = getattr(state, "maximum_concurrent_rpcs", None)
        if limit is not None and getattr(state, "active_rpc_count", 0) >= limit:
            method = handler_call_details.method.rpartition("/")[2]
            metrics.SHED.labels(method if method in _METHODS else "other", "overload").inc()
        return continuation(handler_call_details)


_METHODS = frozenset(pb.DESCRIPTOR.services_by_name["Recommender"].methods_by_name)


def create_server(address: str, app: App, max_workers: int = 8, reuse_port: bool = False,
                  max_concurrent_rpcs: int | None = None,
                  access: Access | None = None) -> tuple[grpc.Server, int]:
    """A started server for ``app`` on ``address`` (``host:0`` picks a free port).

    ``reuse_port`` lets several server processes bind the same port (SO_REUSEPORT; the kernel
    spreads connections across them); off, a second server on a taken port fails loudly.
    ``max_concurrent_rpcs``: RPCs in flight (running + queued) beyond which new ones get
    RESOURCE_EXHAUSTED (None: unbounded queue). ``access``: TLS / mutual TLS / bearer token
    (None: plaintext, no token).
    """
    access = access or Access()
    shed = _ShedCounter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[("grpc.so_reuseport", int(reuse_port))],
                         interceptors=[shed, *access.interceptors()],
                         maximum_concurrent_rpcs=max_concurrent_rpcs)
    shed.state = getattr(server, "_state", None)
    pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(app), server)
    _HEALTH[server] = _configure_maintenance(server)
    port = (server.add_insecure_port(address) if access.credentials is None
            else server.add_secure_port(address, access.credentials))
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    return server, port


def stop(server: grpc.Server, app: App, grace_s: float = 5.0) -> None:
    """NOT_SERVING first, then let in-flight RPCs finish within ``grace_s``."""
    _HEALTH[server].enter_graceful_shutdown()
    server.stop(grace_s).wait()
    app.close()


def registry_source(tracking_uri: str | None, cache_dir: Path, timeout_s: float = 2.0,
                    shared_dir: Path | None = None):
    """(fetch_bundle, probe_version) over the MLflow registry (``tandem.ops.registry``).

    Each call first checks the server answers within ``timeout_s`` (``RegistryUnavailable``
    otherwise: the App then serves its last good bundle). A version without a digest tag or
    whose download does not match it raises ``BundleRejected`` (remembered, not retried).
    ``shared_dir`` (``--processes N``): a version is downloaded there once, by the first
    process that asks, and hard-linked into ``cache_dir`` (``bundle_sync.fetch_once``).
    """
    from tandem.ops import registry

    client = registry.client_for(tracking_uri)

    def probe(alias: str) -> str | None:
        registry.check_reachable(client.tracking_uri, timeout_s)
        version = registry.resolve_alias(alias, client)
        return None if version is None else str(version)

    def fetch(alias: str) -> tuple[Path, str]:
        registry.check_reachable(client.tracking_uri, timeout_s)
        version = registry.resolve_alias(alias, client)
        if version is None:
            raise LookupError(f"registry alias {alias!r} does not exist")
        try:
            if shared_dir is None:
                return registry.download_bundle(version, cache_dir, client), str(version)
            return fetch_once(str(version), shared_dir, cache_dir, lambda dest: (
                registry.download_bundle(version, dest, client))), str(version)
        except registry.BundleDigestError as exc:
            raise BundleRejected(str(version), f"digest: {exc}") from exc

    return fetch, probe


def local_source(bundle_dir: Path):
    """(fetch_bundle, probe_version) for one local folder: version ``local-<created_at>``."""
    version = f"local-{int(BundleManifest.load(bundle_dir).created_at)}"
    return (lambda alias: (bundle_dir, version)), (lambda alias: version)


def _deltas_dir(args: argparse.Namespace) -> str | None:
    """Where the hourly job files new items: ``--deltas-dir``, else the TANDEM_HOME's."""
    if args.deltas_dir:
        return str(Path(args.deltas_dir).resolve())
    if args.feast_home:
        return str(Paths(Path(args.feast_home).resolve()).models / DELTAS)
    return None


def config_from_args(args: argparse.Namespace) -> ServingConfig:
    """The ServingConfig the command-line flags describe."""
    return ServingConfig(mmr_lambda=args.mmr_lambda, ranker_backend=args.ranker_backend,
                         exploration=args.exploration, max_k=args.max_k,
                         online_store_timeout_ms=args.store_timeout_ms,
                         store_breaker_failures=args.breaker_failures,
                         store_breaker_cooldown_s=args.breaker_cooldown_s,
                         genre_cap=args.genre_cap, calibration=args.calibration,
                         mmr_similarity=args.mmr_similarity,
                         intent_floor=args.intent_floor, shadow_sample=args.shadow_sample,
                         deltas_dir=_deltas_dir(args))


def build_app(args: argparse.Namespace, engine_cls=None,
              shadow_aliases: tuple[str, ...] = ()) -> App:
    """The App the command-line flags describe.

    With ``shadow_aliases`` it is the shadow child's (``serving.shadow``): those aliases as its
    split, its own download folder (``<cache>/shadow``, versions fetched once into the shared
    downloads and hard-linked), no impression log, no definitions followed.
    """
    from serving.item_refresh import MaterializationWatcher
    from serving.item_table import ItemFeatures, SharedItemTable

    if shadow_aliases:
        experiment = Experiment("shadow", "", tuple(Variant(a, 1.0, a) for a in shadow_aliases))
    else:
        experiment = (Experiment.load(args.experiment) if args.experiment
                      else Experiment.single(args.alias))
    cfg = config_from_args(args)
    ledger = None
    if args.bundle_dir:
        fetch, probe = local_source(Path(args.bundle_dir))
    else:
        base = Path(args.cache_dir) if args.cache_dir else Paths.default().bundle_cache
        cache, shared = base, None
        if args.processes > 1:  # one download for all, hard-linked into each one's folder
            cache, shared = base / f"process-{args.process_index}", base / SHARED_DOWNLOADS
        if shadow_aliases:
            cache, shared = cache / "shadow", base / SHARED_DOWNLOADS
        fetch, probe = registry_source(args.tracking_uri, cache, args.registry_timeout_s, shared)
        ledger = BundleLedger(cache)
    store, item_features = None, None
    if args.feast_home:
        from tandem.features import feature_store
        from tandem.features import online as FO

        fs = feature_store.open_store(Paths(Path(args.feast_home).resolve()))
        store = FeastStore(fs, socket_timeout_s=args.store_socket_timeout_ms / 1000.0)
        if not args.no_precomputed_feeds:  # feeds the hourly job stored (serving.precomputed)
            from serving.precomputed import WithFeeds, open_feeds

            store = WithFeeds(store, open_feeds(fs))
        watcher = MaterializationWatcher(lambda: feature_store.materialization_watermark(fs),
                                         args.item_refresh_s).start()
        item_features = watcher.track(lambda ids: SharedItemTable(  # one copy for --processes
            lambda rows: FO.ItemFeatureTable(fs, rows), watcher.watermark, ids))
    if args.item_features:  # built once per catalog and mapped by every process
        path = Path(args.item_features)
        item_features = lambda ids: ItemFeatures.shared(path, ids)  # noqa: E731
    if engine_cls is None and args.index_shards > 1:  # scatter-gather over shard processes
        from serving.shards import sharded_engine

        engine_cls = sharded_engine(args.index_shards)
    extra = {"engine_cls": engine_cls} if engine_cls is not None else {}
    if shadow_aliases:
        return App(fetch, probe, experiment, cfg, store, item_features=item_features,
                   ledger=ledger, **extra)
    if args.experiments_file:
        extra["definitions"] = DefinitionsWatcher(Path(args.experiments_file))
    return App(fetch, probe, experiment, cfg, store, sink=_sink(args.impression_sink),
               item_features=item_features, ledger=ledger,
               shadow_source=functools.partial(shadow_app, args), **extra)


def shadow_app(args: argparse.Namespace, aliases: tuple[str, ...]) -> App:
    """The shadow child's engines (runs IN the child, ``serving.shadow``): the server's own
    flags, so the same bundle source and online store; it polls the registry like the server,
    so it follows the shadow alias's hot reloads."""
    app = build_app(args, shadow_aliases=aliases)
    if not args.bundle_dir:
        app.start_polling(args.poll_s)
    return app


def _sink(spec: str | None):
    """``module:factory`` -> an ImpressionSink (``factory()``); None -> the default no-op."""
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)()


def arg_parser() -> argparse.ArgumentParser:
    """The server's command line."""
    parser = argparse.ArgumentParser(description="Tandem gRPC recommender server")
    parser.add_argument("--alias", default="champion", help="registry alias to serve")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server (MLFLOW_TRACKING_URI)")
    parser.add_argument("--bundle-dir", default=None, help="serve this local bundle instead")
    parser.add_argument("--experiment", default=None, help="A/B experiment JSON (tandem.policy.ab)")
    parser.add_argument("--experiments-file", default=None,
                        help="experiment definitions to follow hot (tandem.experiments."
                             "definitions; overrides --experiment while one is active)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus; 0 = off")
    parser.add_argument("--poll-s", type=float, default=30.0, help="registry poll interval")
    parser.add_argument("--feast-home", default=None,
                        help="TANDEM_HOME whose feast/ repo is the online store")
    parser.add_argument("--deltas-dir", default=None,
                        help="hourly new-item deltas (jobs/embed_new_items.py); default "
                             "<feast-home>/models/deltas when --feast-home is given")
    parser.add_argument("--item-refresh-s", type=float, default=60.0,
                        help="how often the Feast item table checks for a new materialization "
                             "(and reloads its rows when there was one)")
    parser.add_argument("--item-features", default=None,
                        help="parquet of raw item feature rows (instead of Feast)")
    parser.add_argument("--cache-dir", default=None,
                        help="downloaded bundles + ledger (default $TANDEM_HOME/serving/bundles)")
    parser.add_argument("--registry-timeout-s", type=float, default=2.0,
                        help="the registry's health check must answer within this")
    parser.add_argument("--store-timeout-ms", type=float, default=20.0,
                        help="a request's online-store read is abandoned after this")
    parser.add_argument("--store-socket-timeout-ms", type=float, default=100.0,
                        help="Redis socket / SQLite lock timeout of a store read (frees its "
                             "thread when the store hangs)")
    parser.add_argument("--breaker-failures", type=int, default=3,
                        help="consecutive failed/late store reads that open the breaker")
    parser.add_argument("--breaker-cooldown-s", type=float, default=5.0,
                        help="how long an open breaker skips the store before one trial read")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=64,
                        help="RPCs in flight (running + queued) beyond which new ones get "
                             "RESOURCE_EXHAUSTED")
    parser.add_argument("--mmr-lambda", type=float,
                        default=ServingConfig.mmr_lambda)
    parser.add_argument("--mmr-similarity", choices=SIMILARITIES,
                        default=ServingConfig.mmr_similarity,
                        help="what MMR calls similar: the items' genre sets or their embeddings "
                             "(tandem.policy.diversify)")
    parser.add_argument("--max-k", type=int, default=100)
    parser.add_argument("--genre-cap", type=int, default=ServingConfig.genre_cap,
                        help="at most this many items per genre in a list; 0 = off")
    parser.add_argument("--calibration", type=float, default=ServingConfig.calibration,
                        help="weight of the list's genre mix matching the genres the session's "
                             "newest items agree on (tandem.policy.diversify); 0 = off")
    parser.add_argument("--intent-floor", type=int, default=ServingConfig.intent_floor,
                        help="at least this many items of the genre the session's newest items "
                             "agree on (tandem.policy.diversify); 0 = off")
    parser.add_argument("--shadow-sample", type=float, default=ServingConfig.shadow_sample,
                        help="share of requests a shadow variant scores off the hot path, in "
                             "its own low-priority process (0-1)")
    parser.add_argument("--exploration", choices=["epsilon_greedy", "thompson", "ucb"],
                        default="epsilon_greedy")
    parser.add_argument("--ranker-backend", choices=["auto", "lleaves", "lightgbm"],
                        default="auto")
    # Requests run Python under one GIL: two workers keep one request in Python while the other
    # is in FAISS / the ranker / the store read. On the 2-core bench box, at a fixed 100 QPS, 8
    # workers gave p99 75 ms and 134 QPS closed loop, 2 gave 26.9 ms and 144 QPS (same run).
    parser.add_argument("--workers", type=int, default=2, help="gRPC worker threads")
    parser.add_argument("--gil-switch-ms", type=float, default=1.0,
                        help="Python's GIL switch interval (default 5 ms); see main()")
    parser.add_argument("--impression-sink", default=None,
                        help="module:factory of a tandem.data.impressions.ImpressionSink "
                        "(e.g. Kafka)")
    parser.add_argument("--index-shards", type=int, default=1,
                        help="split the two-tower index into this many shards, each searched "
                             "by its own process (serving.shards)")
    parser.add_argument("--no-precomputed-feeds", action="store_true",
                        help="never read the feeds serving.precompute_feeds stored")
    parser.add_argument("--processes", type=int, default=1,
                        help="server processes on one port (SO_REUSEPORT), each with its own GIL, "
                             "mapping one downloaded copy of the bundle (serving.shared_memory); "
                             "metrics on --metrics-port + i")
    parser.add_argument("--tls-cert", default=os.environ.get("TANDEM_GRPC_TLS_CERT"),
                        help="PEM certificate chain: serve TLS (TANDEM_GRPC_TLS_CERT)")
    parser.add_argument("--tls-key", default=os.environ.get("TANDEM_GRPC_TLS_KEY"),
                        help="PEM private key, mode 0600 (TANDEM_GRPC_TLS_KEY)")
    parser.add_argument("--tls-client-ca", default=os.environ.get("TANDEM_GRPC_TLS_CLIENT_CA"),
                        help="CA of client certificates: require mutual TLS "
                             "(TANDEM_GRPC_TLS_CLIENT_CA)")
    parser.add_argument("--process-index", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, engine_cls=None) -> None:
    """Run the server until SIGTERM/SIGINT (``engine_cls``: see :class:`serving.app.App`)."""
    parser = arg_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # A request hands the GIL back and forth (FAISS, the ranker and the store read release it):
    # each time it wants it back while another request runs Python it waits up to one switch
    # interval (default 5 ms). Back to back at 100 QPS (bench/serving.py, quiet machine) 1 ms
    # gave p99 16.7 ms against 19.5 ms at 5 ms, at the same closed-loop throughput.
    sys.setswitchinterval(args.gil_switch_ms / 1000.0)
    import faiss

    faiss.omp_set_num_threads(1)  # one core per search; requests run side by side

    if engine_cls is not None and args.processes > 1:
        parser.error("--processes > 1 starts serving.server siblings: not with a custom engine")
    # MLflow's client retries a dead server for minutes; the poller has its own health check
    # and retries every --poll-s, so a few quick retries are enough
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:  # before anything starts: a bad setting is one clear line, not a half-started server
        access = Access.from_settings(args.tls_cert, args.tls_key, args.tls_client_ca)
    except (OSError, ValueError) as exc:
        parser.error(f"access settings: {exc}")
    siblings = _start_siblings(argv if argv is not None else sys.argv[1:], args)
    app = build_app(args, engine_cls)
    if not args.bundle_dir:
        app.start_polling(args.poll_s)
    server, port = create_server(f"{args.host}:{args.port}", app, args.workers,
                                 reuse_port=args.processes > 1,
                                 max_concurrent_rpcs=args.max_concurrent_rpcs, access=access)
    # after the gRPC port: an open metrics port says this process serves (the bench waits on it)
    metrics_port = args.metrics_port + args.process_index if args.metrics_port else 0
    if metrics_port:
        metrics.serve(metrics_port, args.host)
    log.info("serving %s on %s:%d (process %d of %d, metrics port %s)", SERVICE_NAME, args.host,
             port, args.process_index + 1, args.processes, metrics_port or "off")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("shutting down: NOT_SERVING, draining in-flight requests")
    for sibling in siblings:
        sibling.terminate()
    stop(server, app)
    for sibling in siblings:
        sibling.wait(timeout=30)


def _start_siblings(argv: list[str], args: argparse.Namespace) -> list:
    """Processes 2..N of ``--processes`` (started by the first; it stops them when it stops).

    Python serves one request's Python at a time per process: at 100 QPS on two cores one
    process used 0.83 cores while requests queued for its GIL. Separate processes (not forks:
    the Feast SQLite connection and the loaded libraries must not be shared across a fork)
    each build an engine, but a registry bundle is downloaded once for all of them
    (``bundle_sync.fetch_once``) and its big arrays are mapped from shared files
    (``serving.shared_memory``), so an extra process adds its interpreter and its small
    per-request state, not another copy of the bundle.
    """
    import subprocess

    if args.process_index or args.processes <= 1:
        return []
    return [subprocess.Popen([sys.executable, "-m", "serving.server", *argv,
                              "--process-index", str(i)])
            for i in range(1, args.processes)]


if __name__ == "__main__":
    main()
