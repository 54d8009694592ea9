"""Topic names and idempotent creation.

Events are keyed by ``user_id``, so one user's events stay in order on one partition: the landing
consumer's files and the feature consumer's per-user session state both rely on that order.
"""

from __future__ import annotations

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

EVENTS_TOPIC = "tandem.events.v1"
DLQ_TOPIC = "tandem.events.dlq.v1"
DEFAULT_PARTITIONS = 3


def ensure_topics(bootstrap: str, partitions: int = DEFAULT_PARTITIONS,
                  replication: int = 1, names: tuple[str, ...] = (EVENTS_TOPIC, DLQ_TOPIC),
                  ) -> list[str]:
    """Create the topics that do not exist yet; return the names it created.

    Safe to call from every process at start-up: existing topics are left as they are (their
    partition count included), and a concurrent creator's ``TopicAlreadyExists`` is ignored.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tandem-admin")
    try:
        missing = [n for n in names if n not in set(admin.list_topics())]
        created = []
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, partitions, replication)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
