"""Topic names, idempotent creation, and a topic's identity.

Events are keyed by ``user_id``, so one user's events stay in order on one partition: the landing
consumer's files and the feature consumer's per-user session state both rely on that order.

Durability is configuration, not code: ``TANDEM_KAFKA_REPLICATION_FACTOR`` and
``TANDEM_KAFKA_MIN_INSYNC_REPLICAS`` (both 1 by default, what the single embedded broker allows;
3 and 2 on a real cluster, with the producers' ``acks=all``) apply to every topic Tandem creates.

A topic's *identity* is its topic id (KIP-516, a UUID the broker assigns at creation; tansu and
Kafka 2.8+ return it in metadata). Offsets only mean something within one incarnation: a deleted
and recreated topic, or the in-memory embedded broker restarted, starts again at offset 0. So
landing file names and the feature consumer's snapshots carry the id along with the offsets.
"""

from __future__ import annotations

import os
import uuid

from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from tandem.security import kafka_client_kwargs

EVENTS_TOPIC = "tandem.events.v1"
DLQ_TOPIC = "tandem.events.dlq.v1"
DEFAULT_PARTITIONS = 3


def replication_factor() -> int:
    return int(os.environ.get("TANDEM_KAFKA_REPLICATION_FACTOR", "1"))


def min_insync_replicas() -> int:
    return int(os.environ.get("TANDEM_KAFKA_MIN_INSYNC_REPLICAS", "1"))


def ensure_topics(bootstrap: str, partitions: int = DEFAULT_PARTITIONS,
                  replication: int | None = None, min_insync: int | None = None,
                  names: tuple[str, ...] = (EVENTS_TOPIC, DLQ_TOPIC)) -> list[str]:
    """Create the topics that do not exist yet; return the names it created.

    Safe to call from every process at start-up: a topic is created once, by whoever comes
    first, with ``replication`` and ``min.insync.replicas`` from the arguments or else the
    environment; existing topics are left as they are (partition count and configs included), and
    a concurrent creator's ``TopicAlreadyExists`` is ignored.
    """
    replication = replication or replication_factor()
    min_insync = min_insync or min_insync_replicas()
    if not 1 <= min_insync <= replication:
        raise ValueError(f"min.insync.replicas {min_insync} must be in 1..{replication}")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tandem-admin",
                             **kafka_client_kwargs())
    try:
        missing = [n for n in names if n not in set(admin.list_topics())]
        created = []
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, partitions, replication, topic_configs={
                    "min.insync.replicas": str(min_insync)})])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def topic_id(consumer: KafkaConsumer, topic: str) -> str | None:
    """The id of ``topic``'s current incarnation as 32 hex digits, from the consumer's metadata
    cache (no request; None when the broker does not report ids).

    kafka-python keeps ids in its cluster metadata without a public accessor on the consumer.
    """
    cluster = getattr(consumer, "_cluster", None)
    found = cluster.topic_id(topic) if cluster is not None else None
    return uuid.UUID(str(found)).hex if found else None
