"""Shared fixtures: one local Spark session per run, temp state roots, ports, shared data."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

from tandem.config import Paths, movielens_100k_dir  # noqa: E402


def free_port() -> int:
    """A free loopback TCP port (tests bind servers to 127.0.0.1 only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` consecutive free loopback ports (``serving.server --processes n`` puts process i's
    metrics on the first + i)."""
    while True:
        first = free_port()
        try:
            for port in range(first + 1, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return list(range(first, first + n))
        except OSError:
            continue


def wait_for_metrics(proc, ports, timeout_s: float, log: Path | None = None) -> None:
    """Wait until every metrics ``port`` of a started ``serving.server`` answers (its processes
    are up); fail early when ``proc`` exits, with the tail of ``log`` when given."""
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    for port in ports:
        while True:
            tail = log.read_text()[-3000:] if log is not None else ""
            assert proc.poll() is None, f"server exited:\n{tail}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)
                break
            except OSError:
                assert time.time() < deadline, f"metrics port {port} never opened:\n{tail}"
                time.sleep(0.5)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """One local[2] session for the whole run (1-2 partitions keep tiny-data tests fast)."""
    from tandem.spark.session import get_spark

    session = get_spark("tandem-tests", master="local[2]",
                        local_dir=tmp_path_factory.mktemp("spark-local"), shuffle_partitions=2)
    yield session
    session.stop()


@pytest.fixture
def paths(tmp_path) -> Paths:
    """A fresh, empty state root for one test."""
    return Paths(tmp_path / "tandem")


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """MovieLens-100K from ../shared (never copied into the repo); skip when absent."""
    d = movielens_100k_dir()
    if not (d / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found at {d} (set TANDEM_ML100K to its folder)")
    return d


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """One embedded tansu broker (memory storage) on a free loopback port for the whole run.

    Yields the :class:`tandem.streaming.broker.Broker`; use ``.bootstrap`` (``host:port``).
    Tests share it, so each should use its own topic and consumer group.
    """
    from tandem.streaming.broker import start_broker

    broker = start_broker(log_path=tmp_path_factory.mktemp("kafka") / "tansu.log")
    yield broker
    broker.stop()


def start_mlflow_server(root: Path, auth: bool = False):
    """A real ``mlflow server`` under ``root`` on a free loopback port (stop it with ``.stop()``);
    ``auth``: MLflow's basic-auth app (``tandem.ops.mlflow_server.client_env`` has the credentials).

    While the server boots, the first MLflow client call's one-off cost is paid in parallel:
    MLflow loads every ``mlflow.request_header_provider`` plugin, and Feast registers one, which
    imports all of Feast (~9 s of CPU) in the test process.
    """
    import importlib
    import threading

    from tandem.ops.mlflow_server import start_server

    warm = threading.Thread(target=importlib.import_module,
                            args=("mlflow.tracking.request_header.registry",), daemon=True)
    warm.start()
    server = start_server(root, free_port(), auth=auth)
    warm.join()
    return server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One MLflow server (SQLite backend, proxied local artifacts) for the whole run.

    Yields :class:`tandem.ops.mlflow_server.MlflowServer`; use ``.url`` as tracking URI (e.g.
    ``monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)``). Tests share its registry,
    so never assume which version numbers or aliases other tests left behind.
    """
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    """The DAG files parsed by Airflow's own DagBag (a throwaway AIRFLOW_HOME)."""
    home = tmp_path_factory.mktemp("airflow")
    os.environ.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW_CONFIG": str(REPO / "airflow.cfg"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    })
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))
