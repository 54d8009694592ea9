"""The dead-letter topic: records a consumer could not use, with the reason, unchanged.

A bad record (undecodable bytes, a contract violation) must neither stop a consumer nor vanish.
It is copied to ``tandem.events.dlq.v1`` with its original key and value bytes (so it can be
replayed after a fix) and headers that say why and where it came from:

=====================  =======================================================
``dlq.reason``         machine-groupable, e.g. ``undecodable:json``, ``required:user_id``
``dlq.source``         ``<topic>/<partition>/<offset>`` of the original record
``dlq.consumer``       the consumer group that rejected it
``dlq.ts``             when it was rejected (epoch ms)
``dlq.original_bytes`` only on an ``oversized`` record, whose key and value are cut to the cap
=====================  =======================================================

Only an oversized record is cut: copying it whole could exceed what the producer or broker take
for one request, and then the dead letter, and with it the consumer's commit, would fail forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.producer.future import FutureRecordMetadata
from prometheus_client import Counter

from tandem.security import kafka_client_kwargs
from tandem.streaming.codec import MAX_RECORD_BYTES, decode_event
from tandem.streaming.topics import DLQ_TOPIC
from tandem.validation import ContractError, validate_event

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter("tandem_dead_letters_total", "Records sent to the dead-letter topic",
                       ["consumer", "reason"])


class DeadLetterWriter:
    """Copies rejected records to the dead-letter topic (``acks=all``).

    Call :meth:`confirm` before committing the offsets of a batch: it waits for every dead letter
    sent since the last call to be acknowledged and raises if one was not, so the offsets of a
    record whose dead letter was lost are never committed (the restart re-reads and re-sends it).
    """

    def __init__(self, bootstrap: str, consumer: str, topic: str = DLQ_TOPIC,
                 max_bytes: int = MAX_RECORD_BYTES,
                 validator: Callable[[Any, int | None], None] = validate_event) -> None:
        self.topic = topic
        self.validator = validator
        self.consumer = consumer
        self.max_bytes = max_bytes
        self.sent = 0
        self._pending: list[FutureRecordMetadata] = []
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                       client_id=f"{consumer}-dlq", **kafka_client_kwargs())

    def send(self, record: ConsumerRecord, reason: str) -> None:
        headers = [
            ("dlq.reason", reason.encode()),
            ("dlq.source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
            ("dlq.consumer", self.consumer.encode()),
            ("dlq.ts", str(time.time_ns() // 1_000_000).encode()),
        ]
        key, value = record.key, record.value
        if reason == "oversized":
            headers.append(("dlq.original_bytes", str(len(value or b"")).encode()))
            key, value = key and key[: self.max_bytes], value and value[: self.max_bytes]
        self._pending.append(self._producer.send(self.topic, key=key, value=value,
                                                 headers=headers))
        self.sent += 1
        DEAD_LETTERS.labels(self.consumer, reason.split(":")[0]).inc()

    def decode(self, record: ConsumerRecord, reference_ms: int | None = None
               ) -> dict[str, Any] | None:
        """The record's event, or None after dead-lettering it with the reason it was refused."""
        try:
            return decode_event(record.value, reference_ms, self.max_bytes, self.validator)
        except ContractError as err:
            self.send(record, err.reason)
            return None

    def confirm(self, timeout_s: float = 30.0) -> int:
        """Wait until every dead letter sent so far is acknowledged; return how many were.

        Raises the send's error (``KafkaError``, e.g. a timeout) if one failed: the caller must
        not commit then.
        """
        pending, self._pending = self._pending, []
        if pending:
            self._producer.flush(timeout_s)
        for future in pending:
            future.get(timeout=timeout_s)
        return len(pending)

    def close(self) -> None:
        self._producer.close(10)


def reason_of(headers: list[tuple[str, bytes]]) -> str | None:
    """The ``dlq.reason`` header of a dead letter (None if absent)."""
    return next((v.decode() for k, v in headers if k == "dlq.reason"), None)
