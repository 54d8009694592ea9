"""Produce contract-checked events to Kafka, and log serving's impressions without blocking.

Serialization is JSON (UTF-8, compact, one event object as in ``schemas/event.v1.schema.json``),
not Avro: the JSON Schema is the single source of truth that the producers, both consumers and the
Spark ingestion job already validate against; the landing area stores JSON lines, so the landing
consumer writes what it read without a translation step; and it needs no schema registry next to
the broker. The cost is size (~2x Avro) and parse time, both small at Tandem's rates. A breaking
change gets a new schema version and a new topic (``tandem.events.v2``), never an in-place edit.

Records are keyed by ``user_id`` (a user's events stay in order on one partition), sent with
``acks=all``, and batched by the client (``linger_ms``/``batch_size``). The record timestamp is
the producer's create time; the consumers measure freshness from it.

Idempotence is off (kafka-python 3 turns it on by default). An idempotent producer depends on
its producer id surviving on the broker: the embedded in-memory broker forgets it when it
restarts, and brokers without KIP-360 epoch bumps leave the producer failing every later send
for good (``UnknownProducerIdError``, then ``KafkaError`` on all 854 sends after a restart in
bench/chaos.py's broker_restart; without idempotence 86 in-flight sends failed and the rest
were acknowledged). What idempotence would prevent, a retried batch written twice, is handled
downstream: every event has an ``event_id`` and the lake and the feature consumer deduplicate
by it; ``max_in_flight_requests_per_connection=1`` keeps a partition's order across retries.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Iterable
from typing import Any

from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata
from prometheus_client import Counter

from tandem import schema as s
from tandem.data.impressions import Feed
from tandem.features import feature_log
from tandem.security import kafka_client_kwargs
from tandem.streaming.codec import encode_event, now_ms
from tandem.streaming.topics import EVENTS_TOPIC
from tandem.validation import ContractError, validate, validate_event

log = logging.getLogger(__name__)

IMPRESSIONS_LOGGED = Counter("tandem_impressions_logged_total",
                             "Impressions handed to the Kafka producer")
IMPRESSIONS_DROPPED = Counter("tandem_impressions_dropped_total",
                              "Impressions not logged, by reason", ["reason"])
# what the demo's skew step compares with the rows the feature-log consumer landed
FEATURE_ROWS_LOGGED = Counter("tandem_feature_rows_logged_total",
                              "Sampled ranker feature rows handed to the Kafka producer")
FEATURE_ROWS_DROPPED = Counter("tandem_feature_rows_dropped_total",
                               "Sampled ranker feature rows not logged (a malformed sample)")


class EventProducer:
    """Validate, serialize and send events, keyed by ``user_id``.

    Parameters
    ----------
    bootstrap : ``host:port[,host:port]`` of the broker(s).
    topic : destination topic (the events topic by default).
    linger_ms, batch_size : client-side batching; 5 ms adds little latency and lets the client
        send thousands of events per request at load.
    """

    def __init__(self, bootstrap: str, topic: str = EVENTS_TOPIC, linger_ms: int = 5,
                 batch_size: int = 256 * 1024, client_id: str = "tandem-producer") -> None:
        self.topic = topic
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap, client_id=client_id, acks="all", linger_ms=linger_ms,
            batch_size=batch_size, retries=5, max_in_flight_requests_per_connection=1,
            enable_idempotence=False, **kafka_client_kwargs())

    def send(self, event: dict[str, Any]) -> FutureRecordMetadata:
        """Validate ``event`` (no future timestamps) and send it; raises ``ContractError``."""
        validate_event(event, reference_ms=now_ms())
        return self._producer.send(self.topic, key=event[s.USER_ID].encode(),
                                   value=encode_event(event))

    def send_many(self, events: Iterable[dict[str, Any]]) -> int:
        """Send each event (validated); returns how many were handed to the client."""
        n = 0
        for event in events:
            self.send(event)
            n += 1
        return n

    def send_record(self, topic: str, record: dict[str, Any], contract: str
                    ) -> FutureRecordMetadata:
        """Validate ``record`` against ``schemas/<contract>.v1`` and send it to ``topic``,
        keyed by its ``user_id`` (e.g. the serve-time feature log); raises ``ContractError``."""
        validate(record, contract)
        return self._producer.send(topic, key=record[s.USER_ID].encode(),
                                   value=encode_event(record))

    def send_raw(self, key: bytes | None, value: bytes) -> FutureRecordMetadata:
        """Send bytes unchecked: for tests and tools that must produce what the contract forbids."""
        return self._producer.send(self.topic, key=key, value=value)

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        self._producer.close(timeout)


_STOP = object()


def impression_events(feed: Feed) -> list[dict[str, Any]]:
    """One ``impression`` event per served item (position = list index, 0-based).

    ``event_id`` is ``<request_id>:<position>`` (a hash of it when that exceeds the contract's
    64 characters): deterministic, so a re-sent impression deduplicates in the lake.
    """
    context = ({"device": feed.device, "country": feed.country, "surface": feed.surface}
               if (feed.device or feed.country or feed.surface) else None)
    events = []
    for pos, (item, prop) in enumerate(zip(feed.item_ids, feed.propensities, strict=True)):
        eid = f"{feed.request_id}:{pos}"
        if len(eid) > 64:
            eid = hashlib.blake2b(eid.encode(), digest_size=16).hexdigest()
        events.append({
            s.EVENT_ID: eid, s.EVENT_TYPE: s.IMPRESSION, s.USER_ID: feed.user_id,
            s.ITEM_ID: item, s.TS: int(feed.ts), s.REQUEST_ID: feed.request_id,
            s.POSITION: pos, s.CONTEXT: context, s.EXPERIMENT: feed.experiment,
            s.VARIANT: feed.variant, s.MODEL_VERSION: feed.model_version,
            s.PROPENSITY: float(prop)})
    return events


class ImpressionLogger:
    """Serving's impression sink (:class:`tandem.data.impressions.ImpressionSink`).

    :meth:`log` only enqueues the ``Feed`` (a few microseconds); a background thread turns it into
    impression events (:func:`impression_events`), validates and sends them. When the bounded
    queue is full (broker down or too slow) the feed's impressions are dropped and counted in
    ``tandem_impressions_dropped_total{reason="queue_full"}``; invalid ones are counted with
    ``reason="contract:<check>"`` and send failures with ``reason="send_error"``. Nothing is
    dropped silently, and a request never waits on the network.

    Parameters
    ----------
    producer : where impressions go (owned: :meth:`close` closes it).
    max_feeds : queue capacity in feeds (one feed = one request's impressions).
    feature_log_topic : where a feed's sampled feature rows go (``Feed.logged``, one
        ``feature_log.v1`` record per row, :mod:`tandem.features.feature_log`), through the same
        producer and queue; they are dropped and counted like impressions.
    """

    def __init__(self, producer: EventProducer, max_feeds: int = 10_000,
                 feature_log_topic: str = feature_log.FEATURE_LOG_TOPIC) -> None:
        self._producer = producer
        self.feature_log_topic = feature_log_topic
        self._queue: queue.Queue = queue.Queue(max_feeds)
        self.logged = 0
        self.features_logged = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._drain, name="impression-logger",
                                        daemon=True)
        self._thread.start()

    def log(self, feed: Feed) -> None:
        """Enqueue one answered request; never blocks and never raises."""
        try:
            self._queue.put_nowait(feed)
        except queue.Full:
            self._drop("queue_full", len(feed.item_ids))

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped += n
        IMPRESSIONS_DROPPED.labels(reason).inc(n)

    def _drain(self) -> None:
        while True:
            feed = self._queue.get()
            if feed is _STOP:
                return
            try:
                events = impression_events(feed)
            except Exception:  # a malformed feed must not kill the logging thread
                log.exception("bad feed")
                self._drop("bad_feed", len(feed.item_ids))
                continue
            try:  # a bad feature sample loses the sample, never the feed's impressions
                logged = feature_log.records(feed)
            except Exception:
                log.exception("bad feature sample")
                FEATURE_ROWS_DROPPED.inc(len(feed.logged.item_ids) if feed.logged else 0)
                logged = []
            for imp in events:
                if self._send(self._producer.send, imp):
                    self.logged += 1
                    IMPRESSIONS_LOGGED.inc()
            for rec in logged:
                if self._send(self._producer.send_record, self.feature_log_topic, rec,
                              feature_log.CONTRACT):
                    self.features_logged += 1
                    FEATURE_ROWS_LOGGED.inc()

    def _send(self, send, *args) -> bool:
        """One send; a refusal or failure is counted as a drop, never raised."""
        try:
            future = send(*args)
        except ContractError as err:
            self._drop(f"contract:{err.reason}")
            return False
        except Exception:
            log.exception("impression send failed")
            self._drop("send_error")
            return False
        future.add_errback(lambda _exc: self._drop("send_error"))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, flush and close the producer."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._producer.flush(timeout)
        self._producer.close(timeout)


def impression_logger_from_env() -> ImpressionLogger:
    """Serving's ``--impression-sink tandem.streaming.producer:impression_logger_from_env``:
    an :class:`ImpressionLogger` to ``KAFKA_BOOTSTRAP_SERVERS``."""
    from tandem.config import kafka_bootstrap

    bootstrap = kafka_bootstrap()
    if not bootstrap:
        raise RuntimeError("KAFKA_BOOTSTRAP_SERVERS is not set")
    return ImpressionLogger(EventProducer(bootstrap, client_id="tandem-serving"))
