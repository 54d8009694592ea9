"""Serving survives its dependencies (issue 16, item 4).

A real gRPC server on loopback over the synthetic bundle of tests/test_serving.py: overload is
shed with RESOURCE_EXHAUSTED, client deadlines are met, swapped-out engines are freed; a real
MLflow server behind a loopback gate (a TCP forwarder that can refuse connections) for the
registry being down, refused versions and the required digest; a real redis-server stopped
with SIGSTOP for the circuit breaker.
"""

# ruff: noqa: F811 - the fixtures ``world`` and ``redis_url`` are imported from their modules
from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from serving import metrics
from serving.app import App, ServingConfig
from serving.bundle_sync import BundleLedger
from serving.server import create_server, stop
from tandem.models import bundle as B
from tests.conftest import free_port
from tests.test_feature_store_redis import redis_url  # noqa: F401 - fixture
from tests.test_serving import CFG, SlowStore, SynthStore, _req, world  # noqa: F401 - fixture

pytestmark = pytest.mark.serving


def _value(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


@pytest.fixture
def serve():
    """serve(app, **create_server kwargs) -> stub; every server stops at teardown."""
    from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc

    running = []

    def start(app: App, **kwargs):
        server, port = create_server("127.0.0.1:0", app, **kwargs)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        running.append((server, app, channel))
        return pb_grpc.RecommenderStub(channel)

    yield start
    for server, app, channel in running:
        channel.close()
        stop(server, app, grace_s=1.0)


def _flip_app(world, versions: dict) -> App:
    dirs = {"1": world["bundle"], "2": world["bundle2"]}
    return App(lambda alias: (dirs[versions[alias]], versions[alias]),
               lambda alias: versions[alias], None, CFG, SynthStore(),
               item_features=world["items"])


# ------------------------------------------------------------------------------ engines freed

def test_swapped_out_engines_are_freed(world):
    """Ten reloads: every engine but the serving one is gone, and RSS stops growing."""
    versions = {"champion": "1"}
    app = _flip_app(world, versions)
    refs = [weakref.ref(app.engines["champion"])]
    rss = []
    for i in range(10):
        versions["champion"] = "2" if i % 2 == 0 else "1"
        assert app.poll_once() == ["champion"]
        refs.append(weakref.ref(app.engines["champion"]))
        app.recommend(_req_query("u1"))  # the profile cache is filled on every engine
        gc.collect()
        rss.append(psutil.Process().memory_info().rss)
    alive = [r for r in refs if r() is not None]
    assert alive == [refs[-1]], f"{len(alive)} engines alive after 10 reloads"
    growth_mb = (rss[-1] - rss[2]) / 2**20
    assert growth_mb < 30, f"RSS grew {growth_mb:.1f} MB over 8 reloads"
    app.close()


def _req_query(user_id: str):
    from serving.validation import RecommendQuery

    return RecommendQuery(user_id, 10, "tv")


# --------------------------------------------------------------------------- breaker states

def test_breaker_opens_half_opens_and_closes():
    from serving.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker

    now = [0.0]
    breaker = CircuitBreaker(None, failures=2, cooldown_s=5.0, clock=lambda: now[0])
    breaker.record(False)
    breaker.record(True)  # not consecutive: stays closed
    breaker.record(False)
    assert breaker.state == CLOSED and breaker.allow()
    breaker.record(False)
    assert breaker.state == OPEN and not breaker.allow()
    now[0] = 4.9
    assert not breaker.allow()
    now[0] = 5.0
    assert breaker.allow() and breaker.state == HALF_OPEN  # one trial ...
    assert not breaker.allow()  # ... only
    breaker.record(False)  # the trial failed: open for another cool-down
    assert breaker.state == OPEN and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    now[0] = 15.0  # that trial never reported: another one after a further cool-down
    assert breaker.allow() and not breaker.allow()
    breaker.record(True)
    assert breaker.state == CLOSED and breaker.allow() and breaker.allow()


# ----------------------------------------------------------------------- overload, deadlines

def test_overload_is_shed_with_resource_exhausted(world, serve):
    """One worker, at most 2 RPCs in flight: of 8 concurrent slow requests the extra ones are
    refused at once (and counted), the others answered."""
    cfg = ServingConfig(ranker_backend="lightgbm", online_store_timeout_ms=300.0)
    fetch, probe = _local(world)
    app = App(fetch, probe, None, cfg, SlowStore(), item_features=world["items"])
    stub = serve(app, max_workers=1, max_concurrent_rpcs=2)
    before = _value(metrics.SHED, "Recommend", "overload")

    def call(i: int):
        t0 = time.perf_counter()
        try:
            stub.Recommend(_req(f"u{i}", 5), timeout=10)
            return "OK", time.perf_counter() - t0
        except grpc.RpcError as exc:
            return exc.code().name, time.perf_counter() - t0

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, range(8)))
    codes = [c for c, _ in outcomes]
    shed = codes.count("RESOURCE_EXHAUSTED")
    assert shed >= 4 and codes.count("OK") >= 2 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert max(t for c, t in outcomes if c == "RESOURCE_EXHAUSTED") < 0.25  # refused at once
    assert _value(metrics.SHED, "Recommend", "overload") == before + shed


def test_client_deadline_is_met_with_a_fallback(world, serve):
    """The store takes 1 s and its own deadline is 200 ms: a client allowing 150 ms still gets
    an answer in time (the store read is cut to fit); one whose deadline passes while it
    queues behind a slow request is dropped without any work."""
    fetch, probe = _local(world)
    app = App(fetch, probe, None, CFG, SlowStore(), item_features=world["items"])
    stub = serve(app, max_workers=1)
    t0 = time.perf_counter()
    reply = stub.Recommend(_req("u1", 10), timeout=0.15)
    assert time.perf_counter() - t0 < 0.15
    assert "online_store_timeout" in reply.fallbacks and len(reply.items) == 10
    before = _value(metrics.SHED, "Recommend", "deadline")
    before_ok = _value(metrics.REQUESTS, "Recommend", "OK")
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(stub.Recommend, _req("u2", 10), timeout=5)  # holds the one worker
        time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(_req("u3", 10), timeout=0.05)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(slow.result().items) == 10
    time.sleep(0.2)
    # gRPC drops the expired one before any handler runs (a request picked up with under
    # MIN_BUDGET_MS left would be shed by the servicer, counted under reason "deadline")
    assert _value(metrics.REQUESTS, "Recommend", "OK") == before_ok + 1
    assert _value(metrics.SHED, "Recommend", "deadline") == before


def _local(world):
    from serving.server import local_source

    return local_source(world["bundle"])


# ------------------------------------------------------------------------ registry (MLflow)

class Gate:
    """A loopback port forwarding to ``target`` while open; refusing connections when shut
    (the registry "down"), its open connections cut."""

    def __init__(self, target: str):
        host, _, port = target.rpartition("//")[2].partition(":")
        self.target = (host, int(port.rstrip("/")))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def shut(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close does not)
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def gate(mlflow_server):
    g = Gate(mlflow_server.url)
    g.open()
    yield g
    if g.listener is not None:
        g.listener.close()


def _registry_app(world, url: str, alias: str, cache: Path) -> App:
    from serving.server import registry_source
    from tandem.policy.ab import Experiment

    fetch, probe = registry_source(url, cache, timeout_s=1.0)
    return App(fetch, probe, Experiment.single(alias), CFG, SynthStore(),
               item_features=world["items"], ledger=BundleLedger(cache))


def _broken_bundle(world, root: Path) -> Path:
    """The synthetic bundle with ALS user factors of the wrong width: it loads, but every ALS
    search of a known user fails (warm-up fallback ``als_error``)."""
    bad = root / "broken"
    shutil.copytree(world["bundle"], bad)
    users = np.load(bad / B.ALS_USER_FACTORS)
    np.save(bad / B.ALS_USER_FACTORS, users[:, : users.shape[1] // 2].copy())
    return bad


@pytest.mark.mlflow
def test_registry_down_serves_last_good_then_syncs(world, mlflow_server, gate, tmp_path,
                                                   monkeypatch):
    from tandem.ops import registry

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as serving.server sets it low
    alias = f"resilience-{uuid.uuid4().hex[:8]}"
    v1 = registry.log_bundle(world["bundle"], tracking_uri=mlflow_server.url, alias=alias)
    cache = tmp_path / "cache"
    first = _registry_app(world, gate.url, alias, cache)
    assert first.engines[alias].version == str(v1)
    first.close()

    gate.shut()  # the registry is down: a restart serves the last good bundle
    t0 = time.perf_counter()
    app = _registry_app(world, gate.url, alias, cache)
    assert app.engines[alias].version == str(v1)
    assert _value(metrics.LAST_GOOD, alias) == 1
    assert time.perf_counter() - t0 < 60
    v2 = registry.log_bundle(world["bundle2"], tracking_uri=mlflow_server.url, alias=alias)
    t0 = time.perf_counter()
    assert app.poll_once() == []  # still down: a quick miss, still serving v1
    assert time.perf_counter() - t0 < 5 and app.engines[alias].version == str(v1)
    gate.open()
    assert app.poll_once() == [alias]  # back: synced to the alias
    assert app.engines[alias].version == str(v2) and _value(metrics.LAST_GOOD, alias) == 0
    assert not (cache / f"v{v1}").exists()  # the old download is pruned once v2 is good
    app.close()


@pytest.mark.mlflow
def test_refused_version_is_remembered_not_refetched(world, mlflow_server, tmp_path):
    from tandem.ops import registry

    alias = f"resilience-{uuid.uuid4().hex[:8]}"
    good = registry.log_bundle(world["bundle"], tracking_uri=mlflow_server.url, alias=alias)
    cache = tmp_path / "cache"
    app = _registry_app(world, mlflow_server.url, alias, cache)
    bad = registry.log_bundle(_broken_bundle(world, tmp_path), tracking_uri=mlflow_server.url,
                              alias=alias)
    before = _value(metrics.BUNDLE_REJECTED, alias, "warm-up fell back")
    assert app.poll_once() == []  # warm-up had als_error fallbacks: refused, v-good serves
    assert app.engines[alias].version == str(good)
    assert _value(metrics.BUNDLE_REJECTED, alias, "warm-up fell back") == before + 1
    assert "als_error" in app.ledger.is_bad(alias, str(bad))
    inode = os.stat(cache / f"v{bad}").st_ino
    assert app.poll_once() == []  # not downloaded or counted again
    assert os.stat(cache / f"v{bad}").st_ino == inode
    assert _value(metrics.BUNDLE_REJECTED, alias, "warm-up fell back") == before + 1
    app.close()
    restarted = _registry_app(world, mlflow_server.url, alias, cache)  # remembered on disk
    assert restarted.engines[alias].version == str(good)  # not refused (so fetched) again:
    assert _value(metrics.BUNDLE_REJECTED, alias, "warm-up fell back") == before + 1
    restarted.close()


@pytest.mark.mlflow
def test_version_without_digest_is_refused(world, mlflow_server, tmp_path):
    from tandem.ops import registry

    alias = f"resilience-{uuid.uuid4().hex[:8]}"
    good = registry.log_bundle(world["bundle"], tracking_uri=mlflow_server.url, alias=alias)
    cache = tmp_path / "cache"
    app = _registry_app(world, mlflow_server.url, alias, cache)
    bare = registry.log_bundle(world["bundle2"], tracking_uri=mlflow_server.url, alias=alias)
    client = registry.client_for(mlflow_server.url)
    client.delete_model_version_tag(registry.MODEL_NAME, str(bare), registry.DIGEST_TAG)
    before = _value(metrics.BUNDLE_REJECTED, alias, "digest")
    assert app.poll_once() == []
    assert app.engines[alias].version == str(good)
    assert _value(metrics.BUNDLE_REJECTED, alias, "digest") == before + 1
    assert "no tandem.bundle_sha256 tag" in app.ledger.is_bad(alias, str(bare))
    assert not (cache / f"v{bare}").exists()  # refused before downloading anything
    app.close()


# --------------------------------------------------------------- circuit breaker (Redis)

@pytest.mark.redis
@pytest.mark.feast
def test_hung_redis_trips_the_breaker(world, serve, redis_url, tmp_path_factory):
    """redis-server SIGSTOPped: reads time out (socket timeout frees the threads), the breaker
    opens after 2 and requests then skip the store at once; SIGCONT + cool-down: one trial read
    closes it again."""
    from serving.app import FeastStore
    from serving.breaker import CLOSED, OPEN
    from tandem.config import Paths
    from tandem.features import feature_store as fs
    from tests.test_feature_store import T0, T1, write_features

    url = redis_url
    proc = next(p for p in psutil.Process().children()
                if p.name() == "redis-server" and url.rpartition(":")[2] in " ".join(p.cmdline()))
    try:
        paths = Paths(tmp_path_factory.mktemp("feast-redis"))
        write_features(paths)
        store = fs.apply(paths, profile="redis", redis=url)
        fs.materialize(paths, (T0 - timedelta(days=1)).to_pydatetime(),
                       T1.to_pydatetime(), store)
        cfg = ServingConfig(ranker_backend="lightgbm", online_store_timeout_ms=100.0,
                            rank_deadline_ms=5000.0, store_breaker_failures=2,
                            store_breaker_cooldown_s=1.0)
        fetch, probe = _local(world)
        app = App(fetch, probe, None, cfg, FeastStore(store, socket_timeout_s=0.2),
                  item_features=world["items"])
        stub = serve(app)
        assert not stub.Recommend(_req("u1", 10), timeout=5).fallbacks
        proc.send_signal(signal.SIGSTOP)
        replies = []
        for _ in range(6):
            t0 = time.perf_counter()
            reply = stub.Recommend(_req("u1", 10), timeout=5)
            replies.append((list(reply.fallbacks), time.perf_counter() - t0, len(reply.items)))
        assert [f for f, _, _ in replies[:2]] == [["online_store_timeout"]] * 2
        assert all(f == ["online_store_open"] for f, _, _ in replies[2:])
        assert np.median([t for _, t, _ in replies[2:]]) < 0.05  # no 100 ms store wait
        assert all(n == 10 for _, _, n in replies)
        assert app.breaker.state == OPEN and _value(metrics.BREAKER_STATE, "online_store") == 2
        proc.send_signal(signal.SIGCONT)
        time.sleep(1.2)
        assert not stub.Recommend(_req("u1", 10), timeout=5).fallbacks  # the trial read
        assert app.breaker.state == CLOSED
    finally:
        proc.send_signal(signal.SIGCONT)

