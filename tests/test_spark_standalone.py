"""The hourly chain on a real distributed engine: a Spark standalone cluster on loopback.

A master and two workers (1 core, 1 GiB each) are started from the pinned pyspark's own
``bin/spark-class``; ``tandem_hourly`` runs through Airflow (``dag.test()``, the DAG's operators)
with the ``spark_default`` connection pointing at ``spark://127.0.0.1:<port>``, so every Spark task
is a ``spark-submit --master spark://...`` whose executors live in the workers' JVMs. The same
world is then run again in local mode, the same jobs' ``run`` in this process on the tests'
``local[2]`` session (the DAG's command lines are pinned to the jobs' by ``test_daily_chain`` and
``test_dags``); the lake each run leaves (events, quarantine, labels, user and item features)
must be equal row for row. The Airflow metadata DB migrates while the cluster starts.

The workers run on this machine, so they see the lake's local paths and the repo on PYTHONPATH;
on a real cluster the lake is shared storage and the code ships with ``--py-files``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import pyarrow.dataset as pads
import pytest

from tandem.config import Paths

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.spark, pytest.mark.airflow, pytest.mark.slow]
START, END = "2024-01-01T00:00:00+00:00", "2024-01-04T00:00:00+00:00"  # 1 day + late arrivals
OUTPUTS = ("events", "quarantine_events", "ranking_labels", "user_features", "item_features")


def spark_home() -> Path:
    """The pip pyspark package: it ships ``bin/spark-class`` and the jars."""
    return Path(importlib.util.find_spec("pyspark").submodule_search_locations[0])


def _daemon(cls: str, args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A Spark daemon in its own process group (its executors are stopped with it)."""
    return subprocess.Popen([str(spark_home() / "bin" / "spark-class"), cls, *args], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _alive_workers(ui_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as resp:
        state = json.loads(resp.read())
    return sum(w["state"] == "ALIVE" for w in state["workers"])


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """(``spark://127.0.0.1:<port>``, web UI port) of a master with two registered workers."""
    root = tmp_path_factory.mktemp("spark-standalone")
    env = {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1",
           "PYTHONPATH": str(REPO), "PYSPARK_PYTHON": sys.executable,
           "OPENBLAS_NUM_THREADS": "1"}
    port, ui = free_port(), free_port()
    daemons = [_daemon("org.apache.spark.deploy.master.Master",
                       ["--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui)],
                       root / "master.log", env)]
    try:
        for i in range(2):
            daemons.append(_daemon(
                "org.apache.spark.deploy.worker.Worker",
                [f"spark://127.0.0.1:{port}", "--host", "127.0.0.1", "--cores", "1",
                 "--memory", "1g", "--webui-port", str(free_port()),
                 "--work-dir", str(root / f"worker-{i}")], root / f"worker-{i}.log", env))
        deadline = time.monotonic() + 120
        while True:
            try:
                if _alive_workers(ui) == 2:
                    break
            except OSError:
                pass
            assert all(d.poll() is None for d in daemons), (root / "master.log").read_text()
            assert time.monotonic() < deadline, "workers did not register within 120 s"
            time.sleep(1)
        yield f"spark://127.0.0.1:{port}", ui
    finally:
        for d in reversed(daemons):
            _stop(d)


@pytest.fixture(scope="module")
def migrating(tmp_path_factory):
    """(env, the running ``airflow db migrate``): requested before the cluster, so they overlap."""
    from tandem.ops.airflow_client import airflow_env

    paths = Paths(tmp_path_factory.mktemp("standalone-airflow"))
    env = {**os.environ, **airflow_env(paths, port=free_port(),
                                       log_ports=(free_port(), free_port())),
           "TANDEM_TASK_RETRIES": "0", "SPARK_LOCAL_IP": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield env, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def land(root: Path) -> Paths:
    """The tiny world's landing files under ``root``."""
    from tandem.data.world import World
    from tandem.data.world_config import WorldConfig

    paths = Paths(root)
    World.generate(WorldConfig(n_users=60, n_items=40, n_events_target=600, days=1,
                               seed=3)).write(paths)
    return paths


def run_hourly(env: dict, root: Path, master: str) -> Paths:
    """Land the tiny world under ``root`` and run tandem_hourly with spark_default = master."""
    paths = land(root)
    conn = json.dumps({"conn_type": "spark", "host": master})
    proc = subprocess.Popen([sys.executable, "-m", "tandem.ops.airflow_client", "tandem_hourly",
                             json.dumps({"start": START, "end": END})],
                            env={**env, "TANDEM_HOME": str(root),
                                 "AIRFLOW_CONN_SPARK_DEFAULT": conn},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=1200)
    finally:  # on a timeout, stop the task processes too (BashOperator runs each in its own
        if proc.poll() is None:  # session, so they would outlive dag.test)
            tree = psutil.Process(proc.pid)
            for p in [*tree.children(recursive=True), tree]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            proc.wait()
    assert proc.returncode == 0, (out + err)[-6000:]
    assert json.loads(out.strip().splitlines()[-1])["state"] == "success"
    return paths


def _value(v):
    """A cell made comparable: floats to 9 significant digits (summation order may differ
    between engines), arrays and lists as tuples, NaN as a marker."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else float(f"{v:.9g}")
    if isinstance(v, (list, tuple, np.ndarray)):
        return tuple(_value(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _value(x)) for k, x in v.items()))
    if isinstance(v, datetime):  # the instant: the tests' in-process session writes
        # timestamps UTC-adjusted, spark-submit's session without a zone (same wall clock, UTC)
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp()
    return v.item() if isinstance(v, np.generic) else v


def lake_rows(path: Path) -> tuple[list[str], list[str]]:
    """(columns, sorted rows as reprs) of every parquet file under ``path`` (hive partitions)."""
    files = sorted(str(p) for p in path.rglob("*.parquet"))
    if not files:
        return [], []
    table = pads.dataset(files, format="parquet", partitioning="hive",
                         partition_base_dir=str(path)).to_table()
    columns = sorted(table.column_names)
    rows = table.select(columns).to_pylist()
    return columns, sorted(repr(tuple(_value(r[c]) for c in columns)) for r in rows)


def run_local(spark, root: Path) -> Paths:
    """The same world and Spark jobs, in this process on the local-mode session."""
    from jobs import build_features, build_labels, ingest_events

    paths = land(root)
    start, end = datetime.fromisoformat(START), datetime.fromisoformat(END)
    for job in (ingest_events, build_labels, build_features):
        job.run(spark, paths, start, end)
    return paths


@pytest.mark.timeout(1800)  # one hourly chain (3 spark-submits + Feast) on 2 shared cores
def test_hourly_chain_on_a_standalone_cluster_equals_local_mode(migrating, standalone, spark,
                                                                 tmp_path):
    env, migrate = migrating
    url, ui = standalone
    out, _ = migrate.communicate(timeout=300)
    assert migrate.returncode == 0, out[-4000:]
    cluster = run_hourly(env, tmp_path / "cluster", url)
    # the cluster really ran them: each Spark task's spark-submit was an application of its own
    with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5) as resp:
        apps = json.loads(resp.read())["completedapps"]
    assert len(apps) >= 3, apps
    local = run_local(spark, tmp_path / "local")
    seen = []
    for name in OUTPUTS:
        cols_c, rows_c = lake_rows(getattr(cluster, name))
        cols_l, rows_l = lake_rows(getattr(local, name))
        assert cols_c == cols_l, name
        assert rows_c == rows_l, f"{name}: {len(rows_c)} rows on the cluster, {len(rows_l)} local"
        seen.append(len(rows_c))
    events, _, labels, users, items = seen
    assert events > 300 and labels > 0 and users > 0 and items > 0
