"""Kafka streaming: the embedded broker, topics, producers, the lake landing consumer, the
real-time session-feature consumer and the dead-letter topic.

Only the standard Kafka protocol is used (kafka-python), so ``KAFKA_BOOTSTRAP_SERVERS`` switches
from the embedded tansu broker to a real cluster.

May import: the foundation (``tandem.config``, ``schema``, ``validation``, ``security``),
``tandem.data`` and ``tandem.features``.
"""
