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
