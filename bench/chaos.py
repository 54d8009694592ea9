"""Chaos suite (``make chaos``): break one thing at a time under load, against real processes,
and check that nothing is lost.

Each scenario is one function that starts what it needs (a tansu broker, supervised stream
consumers, Spark jobs, an MLflow server, Redis, the gRPC server), drives load, injects its fault
and returns one record::

    {"passed": bool, "lost": int, "duplicated": int, "failed_requests": int, ...details}

Stream scenarios count by ``event_id``: ``acked`` is what the producer had acknowledged (a
send future that succeeded), the lake is what ``jobs.ingest_events`` wrote after the run, and
``lost = |acked - lake|``, ``duplicated = lake rows - distinct ids``; their ``failed_requests``
are sends the producer gave up on (never acknowledged, so not owed to the lake). Serving
scenarios count RPCs: ``failed_requests`` are replies other than OK (and, for overload,
RESOURCE_EXHAUSTED), and the old model must keep answering while the fault lasts.

``python bench/chaos.py [--only a,b] [--out reports/chaos.json] [--work var/chaos]`` runs the
scenarios and writes ``reports/chaos.json`` ``{"scenarios": {name: record}}``; it exits 1 when
one did not pass. Everything runs on loopback ports under ``--work`` (deleted per scenario).
Small loads (a few thousand events, a few hundred RPCs): a scenario proves an invariant, it is
not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tandem import schema as s  # noqa: E402
from tandem.config import Paths  # noqa: E402
from tandem.ops.processes import child_env  # noqa: E402
from tandem.streaming.broker import Broker, S3Endpoint, start_broker, start_s3_endpoint  # noqa: E402
from tandem.streaming.consumer import FETCH_MAX_WAIT_ENV  # noqa: E402
from tandem.streaming.producer import EventProducer  # noqa: E402
from tandem.streaming.supervisor import read_status  # noqa: E402
from tandem.streaming.topics import DLQ_TOPIC, ensure_topics  # noqa: E402
from tests.test_streaming import make_events  # noqa: E402

Record = dict[str, Any]


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` s pass (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


# ------------------------------------------------------------------------------ stream harness

class Load(threading.Thread):
    """Send ``events`` at ``rate`` per second and record which ones the broker acknowledged."""

    def __init__(self, bootstrap: str, topic: str, events: list[dict], rate: float) -> None:
        super().__init__(name="chaos-load", daemon=True)
        self.producer = EventProducer(bootstrap, topic)
        self.events, self.rate = events, rate
        self.acked: set[str] = set()
        self.failed = 0
        self.errors: dict[str, int] = {}  # why sends failed, by exception class
        self.sent = 0

    def _ack(self, event_id: str, _meta: object) -> None:
        self.acked.add(event_id)

    def _fail(self, exc: BaseException) -> None:
        self.failed += 1
        self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1

    def run(self) -> None:
        t0 = time.monotonic()
        for i, event in enumerate(self.events):
            lag = t0 + i / self.rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
            try:
                future = self.producer.send(event)
            except Exception as exc:  # e.g. no metadata within max_block_ms: never acknowledged
                self._fail(exc)
                continue
            future.add_callback(self._ack, event[s.EVENT_ID])
            future.add_errback(self._fail)
            self.sent += 1

    def finish(self, timeout: float = 120.0) -> None:
        """Wait for the last send, then for every acknowledgement or failure."""
        self.join(timeout)
        self.producer.flush(timeout)
        self.producer.close(10)


class StreamRig:
    """A tansu broker, a topic, and supervised landing consumers writing under ``work``.

    ``storage="s3"``: the broker keeps its log in a local S3 endpoint (moto) that lives as long
    as the rig, so a broker restart keeps topics, records and committed offsets."""

    def __init__(self, work: Path, partitions: int = 3, storage: str = "memory") -> None:
        self.work = work
        self.paths = Paths(work / "tandem")
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.s3: S3Endpoint | None = (start_s3_endpoint(log_path=work / "moto.log")
                                      if storage == "s3" else None)
        try:
            self.broker: Broker = start_broker(log_path=work / "tansu.log", s3=self.s3)
        except Exception:
            if self.s3 is not None:
                self.s3.stop()
            raise
        self.topic = "tandem.events.chaos"
        self.partitions = partitions
        ensure_topics(self.broker.bootstrap, partitions, names=(self.topic, DLQ_TOPIC))
        self.supervisors: dict[str, subprocess.Popen] = {}
        # tansu on s3 needs a longer fetch budget than the 50 ms default (tandem.streaming.consumer)
        self.consumer_env = {FETCH_MAX_WAIT_ENV: "2000"} if storage == "s3" else {}

    def supervise(self, name: str, module: str, *extra: str,
                  group: str = "chaos-lake") -> subprocess.Popen:
        """``module`` (a consumer in ``group``) under ``tandem.streaming.supervisor``."""
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        argv = [sys.executable, "-m", "tandem.streaming.supervisor", "--name", name,
                "--status", str(self.status_path(name)), "--backoff-s", "0.2",
                "--max-backoff-s", "1", "--", sys.executable, "-m", module,
                "--home", str(self.paths.root), "--bootstrap", self.broker.bootstrap,
                "--topic", self.topic, "--group", group, "--stats",
                str(self.work / f"{name}.stats.json"), *extra]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=child_env({"PYTHONPATH": str(REPO), **self.consumer_env}))
        self.supervisors[name] = proc
        return proc

    def status_path(self, name: str) -> Path:
        return self.work / f"{name}.supervisor.json"

    def status(self, name: str) -> dict:
        return read_status(self.status_path(name)) or {}

    def child_pid(self, name: str, timeout: float = 30.0) -> int:
        """The running child of supervisor ``name`` (waits until it has one)."""
        wait_until(lambda: bool(self.status(name).get("child_pid")), timeout)
        return int(self.status(name)["child_pid"])

    def processed(self, name: str, pid: int) -> int:
        """Records consumer ``name``'s child ``pid`` processed (its stats file; 0 before)."""
        try:
            stats = json.loads((self.work / f"{name}.stats.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return 0
        return stats["counts"].get("records", 0) if stats.get("pid") == pid else 0

    def landed_by(self) -> dict[str, int]:
        """Events each consumer landed (its last stats file; a killed child's count is gone)."""
        out = {}
        for name in [n for n in self.supervisors if n.startswith("landing")]:
            f = self.work / f"{name}.stats.json"
            out[name] = json.loads(f.read_text())["counts"].get("landed", 0) if f.exists() else 0
        return out

    def landed_ids(self) -> set[str]:
        """Every event id in a landing file (replays collapse; ingest counts them)."""
        ids: set[str] = set()
        for f in self.paths.landing_events.rglob("*.jsonl"):
            ids.update(json.loads(line)[s.EVENT_ID] for line in f.read_text().splitlines())
        return ids

    def restart_broker(self, down_s: float = 1.0) -> float:
        """Stop the broker and start a new one on the same port; returns seconds it was down."""
        port = int(self.broker.bootstrap.rpartition(":")[2])
        t0 = time.monotonic()
        self.broker.stop()
        time.sleep(down_s)
        self.broker = start_broker(port, log_path=self.work / "tansu.log", s3=self.s3)
        return time.monotonic() - t0

    def partitions_of(self, topic: str) -> int:
        """How many partitions the broker reports for ``topic`` now."""
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap, client_id="chaos")
        try:
            return len(admin.describe_topics([topic])[0]["partitions"])
        finally:
            admin.close()

    def stop(self) -> dict[str, int]:
        """SIGTERM each supervisor (its consumer flushes and commits); returns restarts."""
        restarts = {name: int(self.status(name).get("restarts", 0)) for name in self.supervisors}
        for proc in self.supervisors.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.supervisors.values():
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            self.broker.stop()
        finally:
            if self.s3 is not None:
                self.s3.stop()
        return restarts


def wait_settled(left: Callable[[], int], quiet_s: float, step: float = 0.5,
                 progress: Callable[[], object] | None = None) -> bool:
    """Wait on state, not on a clock: until ``left()`` is 0 (True), or until neither ``left()``
    nor ``progress()`` (more evidence of work, e.g. a consumer's processed count) changed for
    ``quiet_s`` (False: the rest is not coming). As long as work goes on, however slowly on a
    loaded machine, it waits."""
    seen: object = None
    since = time.monotonic()
    while True:
        n = left()
        if n == 0:
            return True
        now = (n, progress() if progress is not None else None)
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return False
        time.sleep(step)


def _landed_all(rig: StreamRig, acked: set[str], quiet_s: float = 20.0) -> bool:
    """Wait until every acknowledged event is in a landing file (True), or until nothing new
    landed for ``quiet_s`` (False: the rest is not coming)."""
    return wait_settled(lambda: len(acked - rig.landed_ids()), quiet_s)


def lake_ids(spark, paths: Paths) -> tuple[dict, list[str]]:
    """Ingest every landed hour (jobs.ingest_events) and return its counts and the lake's ids."""
    from jobs.ingest_events import run

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    counts = run(spark, paths, hour - timedelta(hours=2), hour + timedelta(hours=2))
    if not list(paths.events.rglob("*.parquet")):
        return counts, []
    rows = spark.read.parquet(str(paths.events)).select(s.EVENT_ID).collect()
    return counts, [r[0] for r in rows]


def stream_scenario(work: Path, spark, fault: Callable[[StreamRig, Load], dict],
                    n_events: int = 9000, rate: float = 300.0,
                    settle: Callable[[StreamRig, Load], dict] | None = None,
                    features: bool = False, storage: str = "memory") -> Record:
    """Load ``n_events`` through a supervised landing consumer (and feature consumer), call
    ``fault`` mid-load, let everything land (and ``settle``), ingest, and count lost and
    duplicated events against the acknowledged ones. ``storage``: the broker's (StreamRig)."""
    rig = StreamRig(work, storage=storage)
    t0 = time.monotonic()
    try:
        rig.supervise("landing", "tandem.streaming.landing_consumer", "--batch-ms", "200")
        if features:
            rig.supervise("features", "tandem.streaming.feature_consumer", "--snapshot-ms",
                          "1000", group="chaos-features")
        start_ms = int(time.time() * 1000) - 10 * n_events - 60_000
        load = Load(rig.broker.bootstrap, rig.topic, make_events(n_events, "chaos", start_ms,
                                                                 n_users=97), rate)
        rig.child_pid("landing")
        load.start()
        # the fault comes once the consumer lands, while most of the load is still to come
        wait_until(lambda: len(rig.landed_ids()) >= n_events // 20, 90)
        detail = fault(rig, load)
        later = {e[s.EVENT_ID] for e in load.events[load.sent:]}  # sent once the fault ended
        load.finish()
        caught_up = _landed_all(rig, load.acked)
        if settle is not None:
            detail.update(settle(rig, load))
        t_stop = time.monotonic()
    finally:
        restarts = rig.stop()
    detail["landed_by"] = rig.landed_by()
    detail["acked_after_fault"] = len(load.acked & later)
    t_ingest = time.monotonic()
    counts, ids = lake_ids(spark, rig.paths)
    detail["stop_s"] = round(t_ingest - t_stop, 1)
    detail["ingest_s"] = round(time.monotonic() - t_ingest, 1)
    lost = len(load.acked - set(ids))
    detail["lost_after_fault"] = len((load.acked & later) - set(ids))
    duplicated = len(ids) - len(set(ids))
    return {"lost": lost, "duplicated": duplicated, "failed_requests": load.failed,
            "send_errors": load.errors, "acked": len(load.acked), "lake_events": len(ids),
            "caught_up": caught_up,
            "ingest": {k: counts[k] for k in ("read", "valid", "duplicate") if k in counts},
            "restarts": restarts, "seconds": round(time.monotonic() - t0, 1), **detail,
            "passed": lost == 0 and duplicated == 0 and caught_up}


def _kill9(rig: StreamRig, name: str, progress_s: float = 600.0) -> dict:
    """kill -9 consumer ``name`` twice, each time once the running child has processed records:
    mid-work, not while it starts (on a loaded machine a restarted feature consumer took over a
    minute to push its first row, and a kill on a clock landed before it had done anything). A
    child that shows no work within ``progress_s`` is not killed: the record then says which
    one, and the scenario fails on ``killed_mid_work``."""
    killed: list[int] = []
    waited: list[float] = []
    for _ in range(2):
        pid = rig.child_pid(name)
        t0 = time.monotonic()
        if not wait_until(lambda p=pid: rig.processed(name, p) > 0, progress_s, 0.5):
            return {"killed": len(killed), "killed_mid_work": len(killed),
                    "waited_for_work_s": waited,
                    "error": f"{name} child {pid} processed nothing within {progress_s:.0f} s "
                             f"(restarts so far: {rig.status(name).get('restarts')}); see "
                             f"{rig.work / (name + '.log')}"}
        waited.append(round(time.monotonic() - t0, 1))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        wait_until(lambda: rig.status(name).get("child_pid") not in (None, *killed), 30)
    return {"killed": len(killed), "killed_mid_work": len(killed), "waited_for_work_s": waited}


def kill9_landing_consumer(work: Path, spark) -> Record:
    rec = stream_scenario(work, spark, lambda rig, _load: _kill9(rig, "landing"))
    rec["passed"] = rec["passed"] and rec["restarts"]["landing"] >= 2 \
        and rec["killed_mid_work"] == 2
    return rec


def kill9_feature_consumer(work: Path, spark) -> Record:
    """The feature consumer (next to the landing one) is killed twice mid-load; afterwards every
    user's session row in the online store is what a replay of the acknowledged events gives
    (its snapshots and replays lose and double-count nothing), and the lake is complete."""
    from tandem.features.feature_store import open_store
    from tandem.streaming.session_state import replay, session_row
    from tests.test_streaming import GENRES, feature_repo, online_rows

    feature_repo(Paths(work / "tandem"))

    def converged(rig: StreamRig, load: Load) -> dict:
        acked = [e for e in load.events if e[s.EVENT_ID] in load.acked]
        want = {u: session_row(u, st)[s.SESSION_LAST_TS] for u, st in replay(acked, GENRES)
                .items()}
        store = open_store(rig.paths)

        def wrong() -> int:
            rows = online_rows(store, want)
            return sum(rows[u][s.SESSION_LAST_TS] != ts for u, ts in want.items())

        def work_done() -> tuple:
            pid = rig.status("features").get("child_pid")
            return pid, rig.processed("features", pid) if pid else 0

        # while a restarted consumer catches up its processed count moves; only 4 quiet minutes
        # (longer than its slowest start seen, > 2 min on a loaded machine) with neither it nor
        # the wrong sessions moving end the wait
        t0 = time.monotonic()
        ok = wait_settled(wrong, 240, 2.0, progress=work_done)
        return {"users": len(want), "sessions_wrong": wrong(), "sessions_converged": ok,
                "converge_s": round(time.monotonic() - t0, 1)}

    rec = stream_scenario(work, spark, lambda rig, _load: _kill9(rig, "features"),
                          settle=converged, features=True)
    rec["passed"] = rec["passed"] and rec["sessions_converged"] and \
        rec["restarts"]["features"] >= 2 and rec["killed_mid_work"] == 2
    return rec


def _join_second(rig: StreamRig, load: Load) -> dict:
    """A second landing consumer joins the group mid-load; both land until the end."""
    rig.supervise("landing-2", "tandem.streaming.landing_consumer", "--batch-ms", "200")
    rig.child_pid("landing-2")
    return {}


def rebalance(work: Path, spark) -> Record:
    rec = stream_scenario(work, spark, _join_second)
    rec["passed"] = rec["passed"] and min(rec["landed_by"].values()) > 0  # both took a share
    return rec


def _restart_broker(rig: StreamRig, load: Load) -> dict:
    """The broker stops and comes back on its port, on the same S3 storage: the topic it finds
    must be the one it had (its partition count, not one recreated on the fly)."""
    down_s = rig.restart_broker()
    return {"broker_down_s": round(down_s, 1), "partitions_before": rig.partitions,
            "partitions_after_restart": rig.partitions_of(rig.topic)}


def broker_restart(work: Path, spark) -> Record:
    """The broker restarts mid-load on persistent (local S3) storage: every event it had
    acknowledged, consumed or not, reaches the lake once, and the topic keeps its partitions."""
    rec = stream_scenario(work, spark, _restart_broker, storage="s3")
    rec["passed"] = rec["passed"] and rec["partitions_after_restart"] == rec["partitions_before"]
    return rec


# --------------------------------------------------------------------------------- lake swaps

def _ingest_job(paths: Paths, start: datetime, end: datetime, log: Path,
                failpoint: str | None = None) -> int:
    """``python -m jobs.ingest_events`` over ``[start, end)`` as its own process; exit code."""
    from tandem.spark.io import FAILPOINT_ENV

    env = child_env({"PYTHONPATH": str(REPO), FAILPOINT_ENV: failpoint or ""})
    argv = [sys.executable, "-m", "jobs.ingest_events", "--home", str(paths.root), "--start",
            start.isoformat(), "--end", end.isoformat(), "--master", "local[1]"]
    with open(log, "ab") as out:
        return subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=600).returncode


def _lake_by_hour(paths: Paths) -> dict[str, list[str]]:
    """``{"date=.../hour=...": event ids}`` of the lake's events table, read with pyarrow."""
    import pyarrow.parquet as pq

    found: dict[str, list[str]] = {}
    for f in sorted(paths.events.glob("date=*/hour=*/*.parquet")):
        part = f"{f.parent.parent.name}/{f.parent.name}"
        found.setdefault(part, []).extend(pq.read_table(f, columns=[s.EVENT_ID]).column(0)
                                          .to_pylist())
    return found


def task_killed_mid_swap(work: Path) -> Record:
    """Ingest two landing hours; re-run the job and kill -9 it right after it moved the first
    lake partition aside (the moment a partition is absent); the retry must restore it and
    rewrite the interval: the same events, once each, and no swap folder left."""
    from tandem.streaming.consumer import durable_write

    paths = Paths(work / "tandem")
    start = datetime(2026, 1, 5, 10, tzinfo=UTC)
    end = start + timedelta(hours=2)
    events = make_events(2000, "swap", int(start.timestamp() * 1000))
    for h in range(2):
        hour = start + timedelta(hours=h)
        lines = [json.dumps(e) for e in events[h::2]]
        durable_write(paths.landing_events / f"date={hour:%Y-%m-%d}" / f"hour={hour:%H}"
                      / "landed.jsonl", ("\n".join(lines) + "\n").encode())
    log = work / "ingest.log"
    t0 = time.monotonic()
    first = _ingest_job(paths, start, end, log)
    before = _lake_by_hour(paths)
    killed = _ingest_job(paths, start, end, log, failpoint="swap-after-aside")
    hole = len(before) - len(_lake_by_hour(paths))  # partitions absent after the kill
    retry = _ingest_job(paths, start, end, log)
    after = _lake_by_hour(paths)
    ids = [i for part in after.values() for i in part]
    want = {e[s.EVENT_ID] for e in events}
    lost, duplicated = len(want - set(ids)), len(ids) - len(set(ids))
    leftovers = [p.name for p in paths.events.glob("_swap-*")]
    return {"passed": (first, retry) == (0, 0) and killed == -signal.SIGKILL and lost == 0
            and duplicated == 0 and after == before and not leftovers,
            "lost": lost, "duplicated": duplicated, "failed_requests": 0,
            "exit_codes": [first, killed, retry], "partitions_absent_after_kill": hole,
            "partitions": len(after), "swap_folders_left": leftovers,
            "seconds": round(time.monotonic() - t0, 1)}


# ------------------------------------------------------------------------------------ serving

SPEC_ARGS = {"n_items": 2000, "n_users": 5000, "n_als_users": 2000, "n_trees": 20,
             "num_leaves": 7, "n_train_groups": 100, "group_size": 20}


def _bundles(work: Path) -> tuple[Path, Path, Path]:
    """Two synthetic bundles (seeds 0 and 7) and the item features, built once under work."""
    from tandem.models import synthetic_bundle as S

    out = []
    for seed in (0, 7):
        folder = work / f"bundle-{seed}"
        if not (folder / "bundle" / "manifest.json").exists():
            S.build(folder, S.SyntheticSpec(**SPEC_ARGS, seed=seed))
        out.append(folder / "bundle")
    return out[0], out[1], work / "bundle-0" / "item_features.parquet"


def _serve(work: Path, features: Path, *args: str,
           timeout: float = 300.0) -> tuple[subprocess.Popen, int]:
    """``python -m serving.server`` on a free port, until its health check says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import free_port

    port = free_port()
    argv = [sys.executable, "-m", "serving.server", "--port", str(port), "--item-features",
            str(features), "--ranker-backend", "lightgbm", "--poll-s", "1",
            "--registry-timeout-s", "1", *args]
    log = open(work / "serving.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=child_env({"PYTHONPATH": str(REPO)}))
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    serving = health_pb2.HealthCheckResponse.SERVING

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"serving exited with {proc.returncode}; see {work}/serving.log")
        try:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == serving
        except grpc.RpcError:
            return False

    if not wait_until(up, timeout, 0.5):
        proc.kill()
        raise RuntimeError(f"serving not up in {timeout:.0f} s; see {work}/serving.log")
    return proc, port


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _request(i: int):
    from tandem.contracts import recommender_v1_pb2 as pb
    from tandem.models import synthetic_bundle as S

    ctx = pb.Context(device="tv", country="DE", surface="home", ts=S.NOW_MS)
    return pb.RecommendRequest(user_id=f"u{i % 3000}", k=10, context=ctx)


class Rpcs(threading.Thread):
    """Closed-loop Recommend calls on one channel until :meth:`finish`: every reply's status,
    model version and fallbacks, in order."""

    def __init__(self, port: int, timeout_s: float = 2.0) -> None:
        super().__init__(name="chaos-rpcs", daemon=True)
        import grpc

        from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.timeout_s = timeout_s
        self.codes: dict[str, int] = {}
        self.versions: list[str] = []
        self.fallbacks: dict[str, int] = {}
        self.fallback_lists: list[list[str]] = []  # per OK reply, in order
        self.latency_ms: list[float] = []
        self._done = threading.Event()

    def run(self) -> None:
        import grpc

        i = 0
        while not self._done.is_set():
            t0 = time.perf_counter()
            try:
                reply = self.stub.Recommend(_request(i), timeout=self.timeout_s)
                code = "OK"
                self.versions.append(reply.model_version)
                self.fallback_lists.append(list(reply.fallbacks))
                for name in reply.fallbacks:
                    self.fallbacks[name] = self.fallbacks.get(name, 0) + 1
            except grpc.RpcError as exc:
                code = exc.code().name
            self.latency_ms.append((time.perf_counter() - t0) * 1000)
            self.codes[code] = self.codes.get(code, 0) + 1
            i += 1

    def version(self) -> str | None:
        return self.versions[-1] if self.versions else None

    def mark(self) -> int:
        """How many replies so far (to look at what came after a point)."""
        return len(self.versions)

    def failed(self) -> int:
        return sum(n for code, n in self.codes.items() if code != "OK")

    def finish(self) -> dict:
        self._done.set()
        self.join(30)
        self.channel.close()
        lat = sorted(self.latency_ms) or [0.0]
        return {"requests": sum(self.codes.values()), "codes": self.codes,
                "fallbacks": self.fallbacks,
                "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1)}


def _corrupt_new_artifact(root: Path, before: set[Path]) -> str:
    """Flip bytes in the middle of the largest artifact file logged since ``before``."""
    new = [p for p in (root / "artifacts").rglob("*") if p.is_file() and p not in before]
    target = max(new, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(255 - b for b in data[mid:mid + 16])
    target.write_bytes(bytes(data))
    return target.name


def registry_faults(work: Path) -> dict[str, Record]:
    """Serving under a steady request stream while its registry (a real MLflow server) fails.

    ``registry_down_at_start``: serving starts while MLflow is down, serves its last good
    bundle, and syncs to the newer version once MLflow is back. ``corrupt_bundle_promoted``: a
    version whose artifact was corrupted in the registry's store is promoted; the digest check
    refuses it and the old model keeps serving. ``registry_down_during_reload``: a new version is
    promoted and MLflow stops at once, while serving polls for it; serving keeps answering with
    the old one and switches once MLflow is back. Each: zero failed RPCs.
    """
    from tandem.ops import registry
    from tandem.ops.mlflow_server import start_server
    from tests.conftest import free_port

    b1, b2, features = _bundles(work.parent)
    root, port, alias = work / "mlflow", free_port(), "chaos"
    mlflow = start_server(root, port)
    out: dict[str, Record] = {}
    proc = rpcs = None
    try:
        v1 = str(registry.log_bundle(b1, tracking_uri=mlflow.url, alias=alias))
        serve_args = ("--tracking-uri", mlflow.url, "--alias", alias, "--cache-dir",
                      str(work / "cache"))
        proc, _ = _serve(work, features, *serve_args)  # downloads v1: its last good bundle
        _stop(proc)
        mlflow.stop()

        t0 = time.monotonic()
        proc, sport = _serve(work, features, *serve_args)  # the registry is down
        rpcs = Rpcs(sport)
        rpcs.start()
        wait_until(lambda: rpcs.mark() >= 20, 60)
        started_on = rpcs.version()
        mlflow = start_server(root, port)
        v2 = str(registry.log_bundle(b2, tracking_uri=mlflow.url, alias=alias))
        synced = wait_until(lambda: rpcs.version() == v2, 120)
        failed = rpcs.failed()
        out["registry_down_at_start"] = {
            "passed": started_on == v1 and synced and failed == 0, "lost": 0, "duplicated": 0,
            "failed_requests": failed, "started_on": started_on, "last_good": v1,
            "synced_to": rpcs.version(), "promoted": v2,
            "seconds": round(time.monotonic() - t0, 1)}

        t0 = time.monotonic()
        before = {p for p in (root / "artifacts").rglob("*") if p.is_file()}
        v3 = str(registry.log_bundle(b1, tracking_uri=mlflow.url, alias="chaos-staging"))
        corrupted = _corrupt_new_artifact(root, before)
        mark = rpcs.mark()
        registry.client_for(mlflow.url).set_registered_model_alias(registry.MODEL_NAME, alias,
                                                                   v3)
        time.sleep(6)  # several polls
        after = set(rpcs.versions[mark:])
        ledger = json.loads((work / "cache" / "ledger.json").read_text())
        refused = ledger.get("bad", {}).get(alias, {})
        failed_now = rpcs.failed() - failed
        out["corrupt_bundle_promoted"] = {
            "passed": after == {v2} and refused.get("version") == v3 and failed_now == 0,
            "lost": 0, "duplicated": 0, "failed_requests": failed_now,
            "corrupted_file": corrupted, "served_meanwhile": sorted(after),
            "refused": refused, "seconds": round(time.monotonic() - t0, 1)}

        t0 = time.monotonic()
        failed = rpcs.failed()
        mark = rpcs.mark()
        v4 = str(registry.log_bundle(b1, tracking_uri=mlflow.url, alias=alias))
        mlflow.stop()
        time.sleep(4)
        while_down = set(rpcs.versions[mark:])
        mlflow = start_server(root, port)
        synced = wait_until(lambda: rpcs.version() == v4, 120)
        failed_now = rpcs.failed() - failed
        out["registry_down_during_reload"] = {
            "passed": synced and failed_now == 0 and while_down <= {v2, v4}, "lost": 0,
            "duplicated": 0, "failed_requests": failed_now, "served_while_down":
            sorted(while_down), "synced_to": rpcs.version(), "promoted": v4,
            "seconds": round(time.monotonic() - t0, 1)}
    finally:
        try:
            if rpcs is not None:
                load = rpcs.finish()
                for rec in out.values():
                    rec["rpcs_whole_run"] = load
        finally:  # never leave a server or MLflow behind
            if proc is not None:
                _stop(proc)
            mlflow.stop()
    return out


def _redis(folder: Path, port: int) -> subprocess.Popen:
    """redis-server on ``port``, persistence off (the serving scenarios need no rows in it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make system-deps installs it)")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_until(lambda: _accepts(port), 20, 0.05):
        proc.kill()
        raise RuntimeError(f"redis-server did not listen on {port}")
    return proc


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def online_store_faults(work: Path) -> dict[str, Record]:
    """Serving reads a Feast online store on Redis while Redis hangs (SIGSTOP) and then dies
    (SIGKILL, restarted on its port): requests keep getting answers, marked with the store
    fallbacks, the breaker opens and closes again, and no RPC fails."""
    from tandem.features import feature_store as fs
    from tests.conftest import free_port

    b1, _, features = _bundles(work.parent)
    port = free_port()
    redis = {"proc": _redis(work, port)}  # replaced when it is restarted
    fs.apply(Paths(work / "feast"), profile="redis", redis=f"127.0.0.1:{port}")
    proc, sport = _serve(work, features, "--bundle-dir", str(b1), "--feast-home",
                         str(work / "feast"), "--store-timeout-ms", "50",
                         "--store-socket-timeout-ms", "100", "--breaker-failures", "3",
                         "--breaker-cooldown-s", "1")
    rpcs = Rpcs(sport)
    out: dict[str, Record] = {}
    store_fallbacks = ("online_store_timeout", "online_store_error", "online_store_open")

    def healthy_again(mark: int) -> bool:  # a later reply read the store without a fallback
        return any(not f for f in rpcs.fallback_lists[mark:])

    try:
        rpcs.start()
        wait_until(lambda: rpcs.mark() >= 20, 60)
        for name, fault, heal in (
                ("online_store_hung", lambda: redis["proc"].send_signal(signal.SIGSTOP),
                 lambda: redis["proc"].send_signal(signal.SIGCONT)),
                ("online_store_down", lambda: (redis["proc"].kill(), redis["proc"].wait()),
                 lambda: redis.update(proc=_redis(work, port)))):
            t0 = time.monotonic()
            failed, mark = rpcs.failed(), rpcs.mark()
            fault()
            time.sleep(4)
            during = rpcs.fallback_lists[mark:]
            heal()
            back = rpcs.mark()
            recovered = wait_until(lambda b=back: healthy_again(b), 60)
            seen = sorted({f for fl in during for f in fl if f in store_fallbacks})
            failed_now = rpcs.failed() - failed
            out[name] = {  # the breaker opened, every request was answered, and it closed again
                "passed": failed_now == 0 and "online_store_open" in seen and recovered,
                "lost": 0, "duplicated": 0, "failed_requests": failed_now,
                "answered_during_fault": len(during), "store_fallbacks": seen,
                "answered_from_store_during_fault": sum(not f for f in during),  # in flight
                "recovered": recovered, "seconds": round(time.monotonic() - t0, 1)}
    finally:
        try:
            load = rpcs.finish()
            for rec in out.values():
                rec["rpcs_whole_run"] = load
        finally:  # never leave a server or Redis behind
            _stop(proc)
            redis["proc"].send_signal(signal.SIGCONT)
            redis["proc"].kill()
    return out


def overload_10x(work: Path) -> Record:
    """Measure what the server answers closed-loop with all its slots busy, then offer ten
    times that rate for a few seconds: every request is answered OK or refused at once with
    RESOURCE_EXHAUSTED, none fails otherwise, and it still answers afterwards."""
    import grpc

    from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc

    b1, _, features = _bundles(work.parent)
    proc, port = _serve(work, features, "--bundle-dir", str(b1), "--workers", "2",
                        "--max-concurrent-rpcs", "4")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.RecommenderStub(channel)
    t0 = time.monotonic()
    try:
        for i in range(20):  # warm the connection and the caches
            stub.Recommend(_request(i), timeout=10)
        n, t_cap = 0, time.monotonic()
        while time.monotonic() - t_cap < 3:
            stub.Recommend(_request(n), timeout=10)
            n += 1
        capacity = n / (time.monotonic() - t_cap)
        offered, seconds = 10 * capacity, 4.0
        futures, t_burst = [], time.monotonic()
        for i in range(int(offered * seconds)):
            lag = t_burst + i / offered - time.monotonic()
            if lag > 0:
                time.sleep(lag)
            futures.append(stub.Recommend.future(_request(i), timeout=10))
        codes: dict[str, int] = {}
        for f in futures:
            try:
                f.result()
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1
        after = stub.Recommend(_request(0), timeout=10)
    finally:
        channel.close()
        _stop(proc)
    bad = sum(v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED"))
    return {"passed": bad == 0 and codes.get("RESOURCE_EXHAUSTED", 0) > 0
            and codes.get("OK", 0) > 0 and len(after.items) == 10,
            "lost": 0, "duplicated": 0, "failed_requests": bad, "codes": codes,
            "capacity_qps": round(capacity, 1), "offered_qps": round(offered, 1),
            "achieved_offer_qps": round(len(futures) / (time.monotonic() - t_burst), 1),
            "seconds": round(time.monotonic() - t0, 1)}


# ---------------------------------------------------------------------------------------- main

SCENARIOS: dict[str, Callable[..., Record]] = {
    "kill9_landing_consumer": kill9_landing_consumer,
    "kill9_feature_consumer": kill9_feature_consumer,
    "rebalance": rebalance,
    "broker_restart": broker_restart,
    "task_killed_mid_swap": task_killed_mid_swap,
    "overload_10x": overload_10x,
}
# one run that yields several scenarios' records (they share expensive set-up)
GROUPS: dict[str, Callable[[Path], dict[str, Record]]] = {
    "registry": registry_faults,
    "online_store": online_store_faults,
}
GROUP_OF = {name: "registry" for name in ("registry_down_at_start", "corrupt_bundle_promoted",
                                          "registry_down_during_reload")}
GROUP_OF.update({name: "online_store" for name in ("online_store_hung", "online_store_down")})
NEEDS_SPARK = {"kill9_landing_consumer", "kill9_feature_consumer", "rebalance",
               "broker_restart"}


def _failed(exc: Exception, t0: float) -> Record:
    return {"passed": False, "lost": None, "duplicated": None, "failed_requests": None,
            "error": f"{type(exc).__name__}: {exc}", "seconds": round(time.monotonic() - t0, 1)}


def run(names: list[str], work: Path, spark=None) -> dict[str, Record]:
    """Run ``names`` in order, each (or each group) in a fresh ``work/<name>``; a scenario that
    raises is recorded as not passed, with the error. ``spark``: the session the stream
    scenarios ingest with (one is started when they need it and none is given)."""
    if spark is None and NEEDS_SPARK & set(names):
        from tandem.spark.session import get_spark

        spark = get_spark("tandem-chaos", master="local[2]", local_dir=work / "spark-local",
                          shuffle_partitions=2)
        spark.sparkContext.setLogLevel("ERROR")
    results: dict[str, Record] = {}
    for name in names:
        if name in results:
            continue
        group = GROUP_OF.get(name)
        members = [n for n in GROUP_OF if GROUP_OF[n] == group] if group else [name]
        folder = work / (group or name)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        t0 = time.monotonic()
        try:
            if group:
                got = GROUPS[group](folder)
                results.update({n: got.get(n) or _failed(RuntimeError("not reached"), t0)
                                for n in members})
            elif name in NEEDS_SPARK:
                results[name] = SCENARIOS[name](folder, spark)
            else:
                results[name] = SCENARIOS[name](folder)
        except Exception as exc:  # a crashed scenario is a failed one, with its reason
            for n in members:
                results[n] = _failed(exc, t0)
        for n in members:
            print(f"{n}: {json.dumps(results[n])}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Tandem chaos suite")
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--work", type=Path, default=REPO / "var" / "chaos")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "chaos.json")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [*SCENARIOS, *GROUP_OF]
    known = [*SCENARIOS, *GROUP_OF]
    unknown = set(names) - set(known)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; known: {known}")
    results = run(names, args.work.resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"scenarios": results, "written": datetime.now(UTC).isoformat()}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [n for n, r in results.items() if not r["passed"]]
    print(f"{len(results) - len(failed)}/{len(results)} scenarios passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f" -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
