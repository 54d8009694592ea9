"""Streaming against a real tansu broker: landing exactness, crash recovery, DLQ, impressions.

Consumers run as subprocesses (``python -m tandem.streaming.*``) so ``kill -9`` is real. Each test
uses its own topic and consumer group on the session broker. ``end_offsets`` is not trusted
(tansu under-reports high watermarks): a test knows a consumer caught up by counting what it
wrote against what was produced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from kafka import KafkaConsumer, TopicPartition

from tandem import schema as s
from tandem.config import Paths
from tandem.data.impressions import Feed
from tandem.streaming.codec import MAX_RECORD_BYTES
from tandem.streaming.dead_letter import reason_of
from tandem.streaming.producer import EventProducer, ImpressionLogger
from tandem.streaming.session_state import replay, session_row
from tandem.streaming.topics import DLQ_TOPIC, ensure_topics
from tests.test_codec import poison_records

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[1]
TYPES = (s.CLICK, s.PLAY, s.IMPRESSION, s.LIKE, s.RATING, s.IMPRESSION, s.DISLIKE, s.COMPLETE)
GENRES = {f"i{j}": [("Drama", "Comedy", "Action", "Horror", "War", "Crime", "Musical")[j % 7],
                    "Sci-Fi"][: 1 + j % 2] for j in range(40)}


def make_events(n: int, prefix: str, t0: int, n_users: int = 12) -> list[dict]:
    """``n`` valid events, round-robin over users and types, 10 ms apart from ``t0``."""
    return [{s.EVENT_ID: f"{prefix}-{i}", s.EVENT_TYPE: TYPES[i % len(TYPES)],
             s.USER_ID: f"u{i % n_users}", s.ITEM_ID: f"i{(i * 7) % 40}", s.TS: t0 + 10 * i,
             s.SESSION_ID: f"s{i % n_users}", s.POSITION: i % 10,
             s.CONTEXT: {"device": "web", "country": "US", "surface": "home"}}
            for i in range(n)]


def new_topic(bootstrap: str) -> str:
    topic = f"tandem.events.test-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, partitions=3, names=(topic, DLQ_TOPIC))
    return topic


def start(module: str, paths: Paths, bootstrap: str, topic: str, *extra: str) -> subprocess.Popen:
    paths.root.mkdir(parents=True, exist_ok=True)
    log = open(paths.root / f"{module.rsplit('.', 1)[-1]}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", module, "--home", str(paths.root), "--bootstrap", bootstrap,
         "--topic", topic, "--group", f"g-{topic}", *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"consumer exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def landed(paths: Paths) -> list[dict]:
    """Every landed event line (a replayed event appears once per landing)."""
    return [json.loads(line) for f in sorted(paths.landing_events.rglob("*.jsonl"))
            for line in f.read_text().splitlines()]


def ingest(spark, paths: Paths) -> tuple[dict, pd.DataFrame]:
    """Run jobs.ingest_events over the landed hours; return its counts and the lake's ids."""
    run = pytest.importorskip("jobs.ingest_events").run
    now = datetime.now(UTC)
    start_h = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    counts = run(spark, paths, start_h, start_h + timedelta(hours=3))
    return counts, spark.read.parquet(str(paths.events)).select(s.EVENT_ID).toPandas()


def produce(bootstrap: str, topic: str, events: list[dict]) -> None:
    producer = EventProducer(bootstrap, topic)
    producer.send_many(events)
    producer.close()


# ------------------------------------------------------------------ landing: one shared run
@pytest.fixture(scope="module")
def landing_run(kafka_broker, tmp_path_factory):
    """Good events, bad records and one served feed through a landing consumer, then stopped."""
    bootstrap = kafka_broker.bootstrap
    paths = Paths(tmp_path_factory.mktemp("landing") / "tandem")
    paths.root.mkdir(parents=True)
    topic = new_topic(bootstrap)
    proc = start("tandem.streaming.landing_consumer", paths, bootstrap, topic)
    t0 = int(time.time() * 1000) - 60_000
    good = make_events(1500, "ok", t0)
    producer = EventProducer(bootstrap, topic)
    producer.send_many(good[:700])
    bad = {b"{not json": "undecodable:json",
           json.dumps({s.EVENT_TYPE: s.CLICK}).encode(): "required:event_id",
           json.dumps({**good[0], s.EVENT_ID: "bad-type", s.EVENT_TYPE: "hover"}).encode():
               "enum:event_type",
           # each of these once stopped the consumer for good, or could have
           **poison_records(MAX_RECORD_BYTES)}
    for value in bad:
        producer.send_raw(b"u0", value)
    producer.send_many(good[700:])
    producer.flush()
    feed = Feed(request_id="req-1", user_id="u3", ts=t0, item_ids=["i1", "i2", "i3"],
                propensities=[0.5, 0.25, 0.125], model_version="7", experiment="exp",
                variant="B", device="tv", surface="home")
    logger = ImpressionLogger(EventProducer(bootstrap, topic))
    logger.log(feed)
    logger.close()
    assert (logger.logged, logger.dropped) == (3, 0)
    wait_for(lambda: len(landed(paths)) >= len(good) + 3, 60, "landing", proc)
    assert stop(proc) == 0
    return {"paths": paths, "topic": topic, "good": good, "bad": bad, "feed": feed}


@pytest.mark.spark
def test_produce_land_ingest_counts_match_exactly(landing_run, spark):
    paths, good = landing_run["paths"], landing_run["good"]
    rows = landed(paths)
    ids = [r[s.EVENT_ID] for r in rows]
    assert len(ids) == len(set(ids)) == len(good) + 3
    assert {e[s.EVENT_ID] for e in good} <= set(ids)
    files = list(paths.landing_events.rglob("*.jsonl"))
    assert all(f.name.startswith(landing_run["topic"]) for f in files)
    assert not list(paths.landing_events.rglob(".*.tmp"))
    counts, lake = ingest(spark, paths)
    assert len(lake) == lake[s.EVENT_ID].nunique() == len(good) + 3
    assert (counts["read"], counts["invalid"], counts["duplicate"]) == (len(good) + 3, 0, 0)


def dead_letters(bootstrap: str, topic: str) -> dict[bytes, tuple[str | None, dict]]:
    """The dead letters of records from ``topic``: value -> (reason, headers)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=3000)
    tps = [TopicPartition(DLQ_TOPIC, p) for p in consumer.partitions_for_topic(DLQ_TOPIC)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    mine = {rec.value: (reason_of(rec.headers), dict(rec.headers)) for rec in consumer
            if dict(rec.headers)["dlq.source"].decode().startswith(topic + "/")}
    consumer.close()
    return mine


def test_bad_messages_go_to_dead_letter_topic_with_reasons(landing_run, kafka_broker):
    mine = dead_letters(kafka_broker.bootstrap, landing_run["topic"])
    # an oversized record's dead letter carries its first MAX_RECORD_BYTES and its real size
    assert {v: r for v, (r, _) in mine.items()} == {
        v[:MAX_RECORD_BYTES]: r for v, r in landing_run["bad"].items()}
    (cut,) = [h for v, (r, h) in mine.items() if r == "oversized"]
    assert int(cut["dlq.original_bytes"]) > MAX_RECORD_BYTES
    assert all(h["dlq.consumer"] == f"g-{landing_run['topic']}".encode()
               for _, h in mine.values())


def test_served_impressions_arrive_in_lake(landing_run):
    feed = landing_run["feed"]
    imps = sorted((r for r in landed(landing_run["paths"]) if r.get(s.REQUEST_ID) == "req-1"),
                  key=lambda r: r[s.POSITION])
    assert [(r[s.EVENT_TYPE], r[s.ITEM_ID], r[s.POSITION], r[s.PROPENSITY]) for r in imps] == [
        (s.IMPRESSION, "i1", 0, 0.5), (s.IMPRESSION, "i2", 1, 0.25),
        (s.IMPRESSION, "i3", 2, 0.125)]
    assert {(r[s.VARIANT], r[s.MODEL_VERSION], r[s.USER_ID], r[s.EVENT_ID]) for r in imps} == {
        ("B", "7", "u3", f"req-1:{p}") for p in range(3)}
    assert imps[0][s.CONTEXT] == {"device": "tv", "country": None, "surface": "home"}
    assert imps[0][s.TS] == feed.ts


# ------------------------------------------------------------------ crash recovery
@pytest.mark.spark
def test_landing_kill9_then_restart_loses_and_duplicates_nothing(kafka_broker, paths, spark):
    bootstrap = kafka_broker.bootstrap
    paths.root.mkdir(parents=True)
    topic = new_topic(bootstrap)
    events = make_events(3000, "k", int(time.time() * 1000) - 60_000, n_users=50)
    small = ("--batch-max", "100", "--batch-ms", "50")
    module = "tandem.streaming.landing_consumer"
    produce(bootstrap, topic, events[:1500])
    # 1. the worst moment: a file is durable but its offsets are not committed
    proc = start(module, paths, bootstrap, topic, *small, "--crash-after-files", "3")
    assert proc.wait(90) == 137
    crashed_with = len(landed(paths))
    assert crashed_with >= 3  # at least the last of them is read and landed again below
    # 2. a real kill -9 mid-stream; other batch sizes, so replayed records land in new files
    small = ("--batch-max", "70", "--batch-ms", "50")
    proc = start(module, paths, bootstrap, topic, *small)
    wait_for(lambda: len(landed(paths)) >= crashed_with + 400, 60, "more files", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    produce(bootstrap, topic, events[1500:])
    # 3. restart and catch up
    proc = start(module, paths, bootstrap, topic, *small)
    want = {e[s.EVENT_ID] for e in events}
    wait_for(lambda: {r[s.EVENT_ID] for r in landed(paths)} >= want, 90, "catch-up", proc)
    assert stop(proc) == 0
    ids = [r[s.EVENT_ID] for r in landed(paths)]
    assert set(ids) == want  # 0 lost, nothing foreign
    assert len(ids) > len(want)  # the uncommitted file was replayed: duplicates in landing
    counts, lake = ingest(spark, paths)
    assert len(lake) == lake[s.EVENT_ID].nunique() == len(events)  # 0 duplicated after ingest
    assert (counts["read"], counts["duplicate"]) == (len(ids), len(ids) - len(events))


def feature_repo(paths: Paths):
    """A catalog of ``GENRES`` and an applied Feast repo under ``paths``; returns the store."""
    from tandem.data.landing import write_items
    from tandem.features.feature_store import apply, open_store

    paths.root.mkdir(parents=True)
    write_items(pd.DataFrame({s.ITEM_ID: list(GENRES), s.TITLE: list(GENRES),
                              s.GENRES: list(GENRES.values()), s.CREATED_AT: 0}), paths)
    apply(paths)
    return open_store(paths)


def stats_records(path: Path, pid: int | None = None) -> int:
    """Records processed according to the consumer stats file ``path`` (0 before it exists, or
    while it is still another process's than ``pid``)."""
    if not path.exists():
        return 0
    stats = json.loads(path.read_text())
    return stats["counts"]["records"] if pid is None or stats["pid"] == pid else 0


def snapshot_offsets(paths: Paths, topic: str) -> int:
    """The feature consumer's saved next offsets of ``topic`` (group ``g-<topic>``), summed."""
    state = paths.kafka / "state" / f"g-{topic}"
    return sum(json.loads(f.read_text())["offset"] for f in state.glob("*.json"))


def online_rows(store, users) -> dict[str, dict]:
    """The session feature rows of ``users`` in the online store."""
    names = [n for n, _ in s.SESSION_FIELDS]
    got = store.get_online_features(
        features=[f"{s.SESSION_FEATURE_VIEW}:{n}" for n in names],
        entity_rows=[{s.USER_ID: u} for u in users]).to_dict()
    return {u: {n: got[n][i] for n in names} for i, u in enumerate(got[s.USER_ID])}


@pytest.mark.feast
def test_feature_consumer_converges_after_kill9(kafka_broker, paths):
    bootstrap = kafka_broker.bootstrap
    store = feature_repo(paths)
    topic = new_topic(bootstrap)
    now = int(time.time() * 1000)
    # two bursts per user with a gap longer than a session between them
    events = (make_events(900, "f1", now - 2 * s.SESSION_GAP_MS)
              + make_events(900, "f2", now - 60_000))
    args = ("--snapshot-ms", "2000", "--stats", str(paths.root / "features.json"))
    proc = start("tandem.streaming.feature_consumer", paths, bootstrap, topic, *args)

    def processed() -> int:
        return stats_records(paths.root / "features.json")

    produce(bootstrap, topic, events[:600])
    wait_for(lambda: snapshot_offsets(paths, topic) == 600, 90, "a snapshot of the first 600",
             proc)
    # poison records and an event from next year (it would pin u0's session) must not count
    future = {**events[0], s.EVENT_ID: "future", s.TS: now + 365 * 86_400_000}
    bad = {**poison_records(MAX_RECORD_BYTES), json.dumps(future).encode(): "future_ts"}
    producer = EventProducer(bootstrap, topic)
    for value in bad:
        producer.send_raw(b"u0", value)
    producer.close()
    produce(bootstrap, topic, events[600:1200])
    wait_for(lambda: processed() >= 1200 + len(bad), 30, "1200 events pushed", proc)
    proc.send_signal(signal.SIGKILL)  # pushed, most likely not yet snapshotted: a replay
    proc.wait(10)
    # a producer's retries: events again, some of them pushed (and snapshotted) before the kill
    produce(bootstrap, topic, events[1200:] + events[1100:1300])
    proc = start("tandem.streaming.feature_consumer", paths, bootstrap, topic, *args)

    expected = {u: session_row(u, st) for u, st in replay(events, GENRES).items()}
    names = [n for n, _ in s.SESSION_FIELDS]

    def online() -> dict[str, dict]:
        return online_rows(store, expected)

    def converged() -> bool:
        rows = online()
        return all(rows[u][s.SESSION_LAST_TS] == expected[u][s.SESSION_LAST_TS]
                   for u in expected)

    wait_for(converged, 90, "online store to converge", proc)
    wait_for(lambda: json.loads((paths.root / "features.json").read_text())["counts"].get(
        "duplicates", 0) >= 200, 30, "the 200 duplicates counted", proc)
    assert stop(proc) == 0
    assert {v: r for v, (r, _) in dead_letters(bootstrap, topic).items()} == {
        v[:MAX_RECORD_BYTES]: r for v, r in bad.items()}
    rows = online()
    for u, want in expected.items():
        assert rows[u] == {n: want[n] for n in names}, u
    sample = expected["u0"]
    assert sample[s.SESSION_LENGTH] == 75  # 900 / 12 events of the second session
    assert sample[s.SESSION_START_TS] == now - 60_000
    assert len(sample[s.SESSION_RECENT_ITEMS]) <= 20 and sample[s.SESSION_RECENT_GENRES]


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sigterm(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, float, float]:
    """SIGTERM ``proc``; its exit code, the seconds until it exited and the CPU seconds it used
    meanwhile. The CPU is the telling number on a shared machine: at load 20 on 2 cores a
    consumer with nothing left to do took 9 s of wall time to exit, while one that goes on
    importing Feast or pushing a batch after the signal burns seconds of CPU doing it."""
    cpu = _cpu_s(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return (proc.returncode, time.monotonic() - t0,
                    usage.ru_utime + usage.ru_stime - cpu)
        assert time.monotonic() - t0 < timeout, f"no exit {timeout:.0f} s after SIGTERM"
        time.sleep(0.05)


def stopped_promptly(proc: subprocess.Popen) -> tuple[float, float]:
    """SIGTERM ``proc`` and check it exits 0 before its supervisor's 20 s grace runs out, having
    spent under 5 s of CPU after the signal (a caught-up feature consumer's exit: 2.2 s at load
    24, 15.6 s of wall time; the Feast import it used to wait for costs ~9 s of CPU alone);
    returns (wall, CPU) seconds."""
    code, wall_s, cpu_s = sigterm(proc)
    assert code == 0 and wall_s < 20 and cpu_s < 5, (code, wall_s, cpu_s)
    return wall_s, cpu_s


def test_landing_consumer_stops_promptly_on_sigterm_while_catching_up(kafka_broker, paths):
    """SIGTERM in the middle of a 20,000-event backlog: the landing consumer lands what it holds,
    commits and exits 0 promptly (:func:`stopped_promptly`); the next start lands the rest."""
    bootstrap = kafka_broker.bootstrap
    paths.root.mkdir(parents=True)
    topic = new_topic(bootstrap)
    events = make_events(20_000, "lb", int(time.time() * 1000) - 300_000, n_users=2000)
    produce(bootstrap, topic, events)
    module, small = "tandem.streaming.landing_consumer", ("--batch-max", "1000")
    proc = start(module, paths, bootstrap, topic, *small)
    wait_for(lambda: len(landed(paths)) > 0, 90, "the first file", proc)
    took = stopped_promptly(proc)
    assert len(landed(paths)) < len(events)  # it was stopped before the end
    proc = start(module, paths, bootstrap, topic, *small)
    want = {e[s.EVENT_ID] for e in events}
    wait_for(lambda: {r[s.EVENT_ID] for r in landed(paths)} >= want, 120, "the rest", proc)
    assert stop(proc) == 0
    print(f"landing consumer, SIGTERM mid catch-up -> exit in {took[0]:.1f} s wall, "
          f"{took[1]:.2f} s CPU")


@pytest.mark.feast
def test_feature_consumer_stops_promptly_on_sigterm_while_catching_up(kafka_broker, paths):
    """SIGTERM right after the partitions are assigned (the push still waits for Feast to open)
    and again in the middle of a 20,000-event backlog: each time the consumer exits 0 promptly
    (:func:`stopped_promptly`; its supervisor SIGKILLs it after 20 s), and the next start
    converges to the state a replay of every event gives: the abandoned batches are neither
    lost nor counted twice."""
    bootstrap = kafka_broker.bootstrap
    store = feature_repo(paths)
    topic = new_topic(bootstrap)
    events = make_events(20_000, "b", int(time.time() * 1000) - 300_000, n_users=2000)
    produce(bootstrap, topic, events)
    stats = paths.root / "features.json"
    log = paths.root / "feature_consumer.log"
    args = ("--snapshot-ms", "1000", "--stats", str(stats))

    def logged(text: str) -> bool:
        return log.exists() and text in log.read_text()

    # 1. the first batch polled, its push waiting for Feast to open (seconds of import)
    proc = start("tandem.streaming.feature_consumer", paths, bootstrap, topic, *args)
    waiting = "the first push waits for the Feast store to open"
    wait_for(lambda: logged(waiting) or stats_records(stats, proc.pid) > 0, 400,
             "the first push", proc)
    took = [stopped_promptly(proc)]
    assert not logged(waiting) or logged("stopped mid-batch")  # abandoned, not saved
    # 2. mid catch-up: some batches pushed, most of the backlog still to come
    proc = start("tandem.streaming.feature_consumer", paths, bootstrap, topic, *args)
    # Feast opens in seconds on a quiet machine, took over 2 min at load 23 on 2 cores
    wait_for(lambda: stats_records(stats, proc.pid) > 0, 400, "the first batch pushed", proc)
    took.append(stopped_promptly(proc))
    assert snapshot_offsets(paths, topic) < len(events)  # it was stopped before the end
    # 3. a restart catches up and lands where one uninterrupted run would
    proc = start("tandem.streaming.feature_consumer", paths, bootstrap, topic, *args)
    wait_for(lambda: snapshot_offsets(paths, topic) == len(events), 600, "the whole backlog",
             proc)
    took.append(stopped_promptly(proc))
    expected = {u: session_row(u, st) for u, st in replay(events, GENRES).items()}
    rows = online_rows(store, expected)
    names = [n for n, _ in s.SESSION_FIELDS]
    assert len(expected) == 2000
    assert all(rows[u] == {n: want[n] for n in names} for u, want in expected.items())
    print("feature consumer, SIGTERM -> exit (wall s, CPU s) at assignment, mid catch-up, "
          "caught up:", [(round(w, 1), round(c, 2)) for w, c in took])
