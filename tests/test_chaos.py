"""The chaos suite (bench/chaos.py, ``make chaos``): each scenario breaks one thing under load
against real processes and must lose nothing.

The two serving scenarios groups that need no Spark, MLflow or broker (overload, online store
hung and down) are quick enough for every ``make test``; the others are marked ``chaos`` (and
``slow``): ``make test`` leaves them out, ``pytest -m chaos`` runs them as tests, ``make chaos``
runs every scenario and writes ``reports/chaos.json``.
"""

from __future__ import annotations

import json

import pytest

chaos = pytest.importorskip("bench.chaos")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One folder for the module: scenarios share the synthetic bundles built under it."""
    return tmp_path_factory.mktemp("chaos")


def _held(record: dict) -> None:
    """The record says passed, and its numbers agree: nothing lost, duplicated or failed."""
    assert (record["lost"], record["duplicated"], record["failed_requests"]) == (0, 0, 0), record
    assert record["passed"], record


@pytest.mark.serving
def test_overload_10x_is_shed_with_resource_exhausted_only(work, tmp_path):
    out = tmp_path / "chaos.json"
    assert chaos.main(["--only", "overload_10x", "--work", str(work), "--out", str(out)]) == 0
    record = json.loads(out.read_text())["scenarios"]["overload_10x"]
    _held(record)
    codes = record["codes"]
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}
    assert codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > codes["OK"]  # most of 10x is shed
    assert record["offered_qps"] == pytest.approx(10 * record["capacity_qps"], rel=0.01)


@pytest.mark.serving
@pytest.mark.redis
@pytest.mark.feast
def test_online_store_hung_and_down_fail_no_request(work):
    results = chaos.run(["online_store_hung"], work)
    for name in ("online_store_hung", "online_store_down"):
        record = results[name]
        _held(record)
        assert "online_store_open" in record["store_fallbacks"]  # the breaker opened
        assert record["recovered"] and record["answered_during_fault"] > 0


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.serving
@pytest.mark.mlflow
def test_registry_down_and_corrupt_bundle_keep_the_old_model_serving(work):
    results = chaos.run(["registry_down_at_start"], work)
    for name in ("registry_down_at_start", "corrupt_bundle_promoted",
                 "registry_down_during_reload"):
        _held(results[name])
    start = results["registry_down_at_start"]
    assert start["started_on"] == start["last_good"] and start["synced_to"] == start["promoted"]
    corrupt = results["corrupt_bundle_promoted"]
    assert corrupt["served_meanwhile"] == [start["promoted"]]
    assert "digest" in corrupt["refused"]["reason"]


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.spark
def test_a_job_killed_mid_swap_leaves_no_hole(work):
    record = chaos.run(["task_killed_mid_swap"], work)["task_killed_mid_swap"]
    _held(record)
    assert record["exit_codes"][1] == -9 and record["partitions_absent_after_kill"] == 1
    assert record["partitions"] == 2 and not record["swap_folders_left"]


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.spark
@pytest.mark.parametrize("name", ["kill9_landing_consumer", "rebalance"])
def test_stream_faults_lose_and_duplicate_nothing(work, spark, name):
    record = chaos.run([name], work, spark)[name]
    assert (record["lost"], record["duplicated"]) == (0, 0), record
    assert record["passed"] and record["acked"] == record["lake_events"], record


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.spark
@pytest.mark.feast
def test_feature_consumer_killed_twice_converges(work, spark):
    """Each kill lands once the running consumer has pushed rows; afterwards every session in
    the online store is what a replay of the acknowledged events gives."""
    name = "kill9_feature_consumer"
    record = chaos.run([name], work, spark)[name]
    assert (record["lost"], record["duplicated"]) == (0, 0), record
    assert record["killed_mid_work"] == 2 and record["restarts"]["features"] >= 2, record
    assert record["sessions_converged"] and record["sessions_wrong"] == 0, record
    assert record["passed"], record


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.spark
def test_broker_restart_on_s3_storage_loses_nothing(work, spark):
    """The broker restarts mid-load on local S3 storage (moto): everything it acknowledged,
    consumed before the restart or not, is in the lake once, and its topic comes back with the
    partitions it had (not recreated on the fly with the broker's default count)."""
    record = chaos.run(["broker_restart"], work, spark)["broker_restart"]
    _held(record)
    assert record["acked"] == record["lake_events"] and record["caught_up"], record
    assert record["acked_after_fault"] > 0 and record["lost_after_fault"] == 0, record
    assert record["partitions_after_restart"] == record["partitions_before"] == 3, record


@pytest.mark.kafka
def test_the_event_producer_keeps_delivering_after_a_broker_restart(tmp_path):
    """The in-memory broker forgets producer ids when it restarts: an idempotent producer then
    failed every later send for good (UnknownProducerIdError); ours recovers after a few."""
    import time

    from kafka.errors import KafkaError

    from tandem.streaming.broker import start_broker
    from tandem.streaming.producer import EventProducer
    from tandem.streaming.topics import ensure_topics
    from tests.test_streaming import make_events

    broker = start_broker(log_path=tmp_path / "tansu.log")
    topic = "tandem.events.restart"
    events = make_events(600, "restart", int(time.time() * 1000) - 60_000)
    producer = EventProducer(broker.bootstrap, topic)

    def delivered(batch: list[dict]) -> int:
        futures = [producer.send(e) for e in batch]
        producer.flush(60)
        ok = 0
        for f in futures:
            try:
                f.get(0)
                ok += 1
            except KafkaError:
                pass
        return ok

    try:
        ensure_topics(broker.bootstrap, 3, names=(topic,))
        assert delivered(events[:200]) == 200
        port = int(broker.bootstrap.rpartition(":")[2])
        broker.stop()
        broker = start_broker(port, log_path=tmp_path / "tansu.log")
        delivered(events[200:400])  # the first sends to the new broker may fail
        assert delivered(events[400:]) == 200
    finally:
        producer.close()
        broker.stop()
