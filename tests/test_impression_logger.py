"""Serving's impression hook: never blocks, counts every drop (no broker: a stalled producer)."""

from __future__ import annotations

import threading
from dataclasses import replace

from prometheus_client import REGISTRY

from tandem import schema as s
from tandem.data.impressions import Feed
from tandem.streaming.producer import ImpressionLogger, impression_events


class StalledProducer:
    """Accepts the first send, then blocks every send until released (a broker that hangs)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sent: list[dict] = []

    def send(self, event: dict):
        self.sent.append(event)
        self.release.wait(10)
        return _Future()

    def flush(self, timeout=None) -> None:
        return None

    def close(self, timeout=None) -> None:
        return None


class _Future:
    def add_errback(self, fn) -> None:
        return None


def feed(request_id: str, n: int = 2) -> Feed:
    return Feed(request_id=request_id, user_id="u1", ts=1_700_000_000_000,
                item_ids=[f"i{k}" for k in range(n)], propensities=[0.5] * n,
                model_version="3", experiment="e", variant="A")


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("tandem_impressions_dropped_total", {"reason": reason}) or 0


def test_full_queue_drops_and_counts_instead_of_blocking():
    producer = StalledProducer()
    logger = ImpressionLogger(producer, max_feeds=1)
    before = dropped("queue_full")
    logger.log(feed("r0"))  # taken by the sender thread, which then stalls on the broker
    while not producer.sent:
        pass
    logger.log(feed("r1"))  # waits in the queue
    logger.log(feed("r2", n=3))  # queue full: dropped, counted, and log() returned at once
    assert logger.dropped == 3
    assert dropped("queue_full") - before == 3
    producer.release.set()
    logger.close()
    assert [e[s.EVENT_ID] for e in producer.sent] == ["r0:0", "r0:1", "r1:0", "r1:1"]
    assert logger.logged == 4


def test_impression_events_follow_the_contract():
    from tandem.validation import validate_event

    events = impression_events(feed("req-9", n=3))
    for e in events:
        validate_event(e)
    assert [(e[s.POSITION], e[s.EVENT_TYPE], e[s.CONTEXT]) for e in events] == [
        (0, s.IMPRESSION, None), (1, s.IMPRESSION, None), (2, s.IMPRESSION, None)]
    long_id = impression_events(feed("r" * 64, n=1))[0][s.EVENT_ID]
    assert len(long_id) == 32  # hashed to stay within the contract's 64 characters


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.records: list[dict] = []

    def send(self, event: dict):
        self.sent.append(event)
        return _Future()

    def send_record(self, topic: str, record: dict, contract: str):
        self.records.append(record)
        return _Future()

    def flush(self, timeout=None) -> None:
        return None

    def close(self, timeout=None) -> None:
        return None


def test_a_malformed_feature_sample_loses_the_sample_never_the_impressions():
    import numpy as np

    from tandem.data.impressions import FeatureSample

    producer = RecordingProducer()
    logger = ImpressionLogger(producer)
    before = REGISTRY.get_sample_value("tandem_feature_rows_dropped_total") or 0
    bad = FeatureSample(["i0"], ("a", "b", "c"), np.zeros((1, 2), np.float32), 1, None)
    good = FeatureSample(["i1"], ("a", "b"), np.ones((1, 2), np.float32), 1, None)
    logger.log(replace(feed("r0"), logged=bad))
    logger.log(replace(feed("r1"), logged=good))
    logger.close()
    assert [e[s.EVENT_ID] for e in producer.sent] == ["r0:0", "r0:1", "r1:0", "r1:1"]
    assert [r["request_id"] for r in producer.records] == ["r1"]
    assert REGISTRY.get_sample_value("tandem_feature_rows_dropped_total") - before == 1
