"""Landing never overwrites: file names carry the topic's incarnation (its topic id), and a name
that exists with other bytes is never replaced. Topics are created with the configured
replication factor and min.insync.replicas."""

from __future__ import annotations

import time

import pytest
from kafka.admin import KafkaAdminClient

from tandem import schema as s
from tandem.config import Paths
from tandem.streaming.consumer import write_once
from tandem.streaming.topics import DLQ_TOPIC, ensure_topics
from tests.test_streaming import landed, make_events, new_topic, produce, start, stop, wait_for


def test_write_once_keeps_an_existing_file_and_lands_other_bytes_beside_it(tmp_path):
    path = tmp_path / "date=2024-01-01" / "hour=00" / "t-0-0-9.jsonl"
    assert write_once(path, b"a\n") == path
    assert write_once(path, b"a\n") == path  # a replayed batch: the same bytes, kept
    other = write_once(path, b"b\n")
    assert other != path and other.name.startswith("t-0-0-9.") and other.suffix == ".jsonl"
    assert (path.read_bytes(), other.read_bytes()) == (b"a\n", b"b\n")
    assert write_once(path, b"b\n") == other
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, other.name])


def test_ensure_topics_refuses_min_insync_above_replication():
    with pytest.raises(ValueError, match="min.insync.replicas"):
        ensure_topics("127.0.0.1:1", replication=1, min_insync=2)


@pytest.mark.kafka
def test_topics_get_the_configured_replication_factor(kafka_broker, monkeypatch):
    """The single embedded broker allows 1 (tansu accepts ``min.insync.replicas`` at creation but
    does not report topic configs back, so only the replicas are checked here)."""
    monkeypatch.setenv("TANDEM_KAFKA_REPLICATION_FACTOR", "1")
    monkeypatch.setenv("TANDEM_KAFKA_MIN_INSYNC_REPLICAS", "1")
    topic = new_topic(kafka_broker.bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    try:
        (partitions,) = [t["partitions"] for t in admin.describe_topics([topic])]
    finally:
        admin.close()
    assert len(partitions) == 3 and all(len(p["replica_nodes"]) == 1 for p in partitions)


def recreate(bootstrap: str, topic: str) -> None:
    """Delete ``topic`` and create it again: a new incarnation, offsets from 0."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.delete_topics([topic])
    admin.close()
    time.sleep(1)
    ensure_topics(bootstrap, partitions=3, names=(topic, DLQ_TOPIC))


@pytest.mark.kafka
def test_a_recreated_topic_does_not_replace_earlier_landing_files(kafka_broker, tmp_path):
    """Delete and recreate the topic (offsets restart at 0, as after a restart of the in-memory
    broker): the second incarnation's batches land in new files; the first's stay as they were."""
    bootstrap = kafka_broker.bootstrap
    paths = Paths(tmp_path / "tandem")
    paths.root.mkdir(parents=True)
    topic = new_topic(bootstrap)
    t0 = int(time.time() * 1000) - 60_000
    first, second = make_events(90, "one", t0), make_events(90, "two", t0)
    module = "tandem.streaming.landing_consumer"
    produce(bootstrap, topic, first)
    proc = start(module, paths, bootstrap, topic)
    wait_for(lambda: len(landed(paths)) >= len(first), 60, "the first incarnation", proc)
    assert stop(proc) == 0
    before = {f: f.read_bytes() for f in paths.landing_events.rglob("*.jsonl")}
    recreate(bootstrap, topic)
    produce(bootstrap, topic, second)
    proc = start(module, paths, bootstrap, topic, "--group", f"g2-{topic}")
    want = {e[s.EVENT_ID] for e in first + second}
    wait_for(lambda: {r[s.EVENT_ID] for r in landed(paths)} >= want, 60, "both", proc)
    assert stop(proc) == 0
    assert all(f.read_bytes() == data for f, data in before.items())  # nothing replaced
    files = set(paths.landing_events.rglob("*.jsonl"))
    ids = {f.name.removeprefix(topic + "-").split("-")[0] for f in files}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)  # one topic id per incarnation
    assert len(landed(paths)) == len(want)


@pytest.mark.feast
def test_feature_snapshots_are_tied_to_the_topic_incarnation(kafka_broker, paths):
    """A snapshot's offsets belong to the topic id it records: after the topic is recreated, the
    consumer reads the new incarnation from offset 0 instead of skipping as many events."""
    import json

    from tandem.streaming.session_state import replay, session_row
    from tests.test_streaming import GENRES, feature_repo, online_rows

    bootstrap = kafka_broker.bootstrap
    store = feature_repo(paths)
    topic = new_topic(bootstrap)
    now = int(time.time() * 1000)
    old, new = make_events(60, "old", now - 120_000), make_events(150, "new", now - 60_000)
    module, args = "tandem.streaming.feature_consumer", ("--snapshot-ms", "300")
    state = paths.kafka / "state" / f"g-{topic}"

    def snapshots() -> list[dict]:
        return [json.loads(f.read_text()) for f in state.glob("*.json")]

    produce(bootstrap, topic, old)
    proc = start(module, paths, bootstrap, topic, *args)
    wait_for(lambda: sum(snap["offset"] for snap in snapshots()) == len(old), 90, "snapshot",
             proc)
    assert stop(proc) == 0
    (first_id,) = {snap["topic_id"] for snap in snapshots()}
    recreate(bootstrap, topic)
    produce(bootstrap, topic, new)
    proc = start(module, paths, bootstrap, topic, *args)
    wait_for(lambda: sum(snap["offset"] for snap in snapshots()) == len(new), 90,
             "the new incarnation from 0", proc)
    assert stop(proc) == 0
    assert first_id not in {snap["topic_id"] for snap in snapshots()}
    expected = {u: session_row(u, st) for u, st in replay(old + new, GENRES).items()}
    rows = online_rows(store, expected)
    for u, want in expected.items():
        assert rows[u] == {n: want[n] for n, _ in s.SESSION_FIELDS}, u
