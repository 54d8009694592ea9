"""The dead-letter topic: records a consumer could not use, with the reason, unchanged.

A bad record (undecodable bytes, a contract violation) must neither stop a consumer nor vanish.
It is copied to ``tandem.events.dlq.v1`` with its original key and value bytes (so it can be
replayed after a fix) and headers that say why and where it came from:

=====================  =======================================================
``dlq.reason``         machine-groupable, e.g. ``undecodable:json``, ``required:user_id``
``dlq.source``         ``<topic>/<partition>/<offset>`` of the original record
``dlq.consumer``       the consumer group that rejected it
``dlq.ts``             when it was rejected (epoch ms)
=====================  =======================================================
"""

from __future__ import annotations

import time

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter

from tandem.streaming.topics import DLQ_TOPIC

DEAD_LETTERS = Counter("tandem_dead_letters_total", "Records sent to the dead-letter topic",
                       ["consumer", "reason"])


class DeadLetterWriter:
    """Copies rejected records to the dead-letter topic (``acks=all``).

    Call :meth:`flush` before committing the offsets of a batch that had rejects, so a crash can
    re-send a dead letter (harmless) but never lose one.
    """

    def __init__(self, bootstrap: str, consumer: str, topic: str = DLQ_TOPIC) -> None:
        self.topic = topic
        self.consumer = consumer
        self.sent = 0
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                       client_id=f"{consumer}-dlq")

    def send(self, record: ConsumerRecord, reason: str) -> None:
        headers = [
            ("dlq.reason", reason.encode()),
            ("dlq.source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
            ("dlq.consumer", self.consumer.encode()),
            ("dlq.ts", str(time.time_ns() // 1_000_000).encode()),
        ]
        self._producer.send(self.topic, key=record.key, value=record.value, headers=headers)
        self.sent += 1
        DEAD_LETTERS.labels(self.consumer, reason.split(":")[0]).inc()

    def flush(self, timeout: float | None = 30.0) -> None:
        self._producer.flush(timeout)

    def close(self) -> None:
        self._producer.close(10)


def reason_of(headers: list[tuple[str, bytes]]) -> str | None:
    """The ``dlq.reason`` header of a dead letter (None if absent)."""
    return next((v.decode() for k, v in headers if k == "dlq.reason"), None)
