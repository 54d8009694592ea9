"""The gRPC server process: ``python -m serving.server --alias champion --port 50051``.

``create_server(address, app)`` returns ``(server, port)`` (bind ``127.0.0.1:0`` in tests).
Health checking (``grpc.health.v1``, non-blocking) and server reflection are set up together in
``_configure_maintenance``, so ``grpcurl -plaintext host:port list`` and
``grpc_health_probe`` work. Shutdown marks every service NOT_SERVING first (load balancers stop
sending), then ``server.stop(grace)`` lets in-flight RPCs finish.

Bundles come from the MLflow registry by alias (``--alias``, default ``champion``; the
A/B experiment file may name more) and are re-checked every ``--poll-s`` seconds; ``--bundle-dir``
serves one local folder instead (no reload).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread per request; requests run side by side

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
from concurrent import futures  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402

from serving import metrics  # noqa: E402
from serving.app import App, FeastStore, ServingConfig  # noqa: E402
from serving.servicer import RecommenderServicer  # noqa: E402
from tandem.ab import Experiment  # noqa: E402
from tandem.bundle import BundleManifest  # noqa: E402
from tandem.contracts import recommender_v1_pb2 as pb  # noqa: E402
from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc  # noqa: E402

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


def create_server(address: str, app: App, max_workers: int = 8,
                  reuse_port: bool = False) -> tuple[grpc.Server, int]:
    """A started server for ``app`` on ``address`` (``host:0`` picks a free port).

    ``reuse_port`` lets several server processes bind the same port (SO_REUSEPORT; the kernel
    spreads connections across them); off, a second server on a taken port fails loudly.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[("grpc.so_reuseport", int(reuse_port))])
    pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(app), server)
    _HEALTH[server] = _configure_maintenance(server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    return server, port


def stop(server: grpc.Server, app: App, grace_s: float = 5.0) -> None:
    """NOT_SERVING first, then let in-flight RPCs finish within ``grace_s``."""
    _HEALTH[server].enter_graceful_shutdown()
    server.stop(grace_s).wait()
    app.close()


def registry_source(tracking_uri: str | None, cache_dir: Path):
    """(fetch_bundle, probe_version) over the MLflow registry (``tandem.registry``)."""
    from tandem import registry

    client = registry.client_for(tracking_uri)

    def probe(alias: str) -> str | None:
        version = registry.resolve_alias(alias, client)
        return None if version is None else str(version)

    def fetch(alias: str) -> tuple[Path, str]:
        version = registry.resolve_alias(alias, client)
        if version is None:
            raise LookupError(f"registry alias {alias!r} does not exist")
        return registry.download_bundle(version, cache_dir, client), str(version)

    return fetch, probe


def local_source(bundle_dir: Path):
    """(fetch_bundle, probe_version) for one local folder: version ``local-<created_at>``."""
    version = f"local-{int(BundleManifest.load(bundle_dir).created_at)}"
    return (lambda alias: (bundle_dir, version)), (lambda alias: version)


def build_app(args: argparse.Namespace, engine_cls=None) -> App:
    """The App the command-line flags describe."""
    import pandas as pd

    from serving.app import ItemFeatures

    experiment = (Experiment.load(args.experiment) if args.experiment
                  else Experiment.single(args.alias))
    cfg = ServingConfig(mmr_lambda=args.mmr_lambda, ranker_backend=args.ranker_backend,
                        exploration=args.exploration, max_k=args.max_k,
                        genre_cap=args.genre_cap)
    if args.bundle_dir:
        fetch, probe = local_source(Path(args.bundle_dir))
    else:
        cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="tandem-bundles-"))
        fetch, probe = registry_source(args.tracking_uri, cache)
    store, item_features = None, None
    if args.feast_home:
        from tandem import feature_store
        from tandem.config import Paths

        fs = feature_store.open_store(Paths(Path(args.feast_home).resolve()))
        store = FeastStore(fs)
        item_features = lambda ids: feature_store.ItemFeatureTable(fs, ids)  # noqa: E731
    if args.item_features:
        frame = pd.read_parquet(args.item_features)
        item_features = lambda ids: ItemFeatures.from_frame(frame, pd.Index(ids))  # noqa: E731
    extra = {"engine_cls": engine_cls} if engine_cls is not None else {}
    return App(fetch, probe, experiment, cfg, store, sink=_sink(args.impression_sink),
               item_features=item_features, **extra)


def _sink(spec: str | None):
    """``module:factory`` -> an ImpressionSink (``factory()``); None -> the default no-op."""
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)()


def main(argv: list[str] | None = None, engine_cls=None) -> None:
    """Run the server until SIGTERM/SIGINT (``engine_cls``: see :class:`serving.app.App`)."""
    parser = argparse.ArgumentParser(description="Tandem gRPC recommender server")
    parser.add_argument("--alias", default="champion", help="registry alias to serve")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server (MLFLOW_TRACKING_URI)")
    parser.add_argument("--bundle-dir", default=None, help="serve this local bundle instead")
    parser.add_argument("--experiment", default=None, help="A/B experiment JSON (tandem.ab)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus; 0 = off")
    parser.add_argument("--poll-s", type=float, default=30.0, help="registry poll interval")
    parser.add_argument("--feast-home", default=None,
                        help="TANDEM_HOME whose feast/ repo is the online store")
    parser.add_argument("--item-features", default=None,
                        help="parquet of raw item feature rows (instead of Feast)")
    parser.add_argument("--cache-dir", default=None, help="where downloaded bundles go")
    parser.add_argument("--mmr-lambda", type=float, default=0.7)
    parser.add_argument("--max-k", type=int, default=100)
    parser.add_argument("--genre-cap", type=int, default=0,
                        help="at most this many items per genre in a list; 0 = off")
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
                        help="module:factory of a tandem.impressions.ImpressionSink (e.g. Kafka)")
    parser.add_argument("--processes", type=int, default=1,
                        help="server processes on one port (SO_REUSEPORT), each with its own GIL "
                             "and its own copy of the bundle; metrics on --metrics-port + i")
    parser.add_argument("--process-index", type=int, default=0, help=argparse.SUPPRESS)
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
    siblings = _start_siblings(argv if argv is not None else sys.argv[1:], args)
    app = build_app(args, engine_cls)
    if not args.bundle_dir:
        app.start_polling(args.poll_s)
    server, port = create_server(f"{args.host}:{args.port}", app, args.workers,
                                 reuse_port=args.processes > 1)
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
    each load the bundle, so memory grows with N.
    """
    import subprocess

    if args.process_index or args.processes <= 1:
        return []
    return [subprocess.Popen([sys.executable, "-m", "serving.server", *argv,
                              "--process-index", str(i)])
            for i in range(1, args.processes)]


if __name__ == "__main__":
    main()
