"""Land the event stream in the lake's raw area as JSON-lines micro-batches (group ``tandem-lake``).

Each flush writes one file per partition::

    landing/events/date=YYYY-MM-DD/hour=HH/<topic>-<topic id>-<partition>-<first>-<last>.jsonl

where date/hour are the batch's *arrival* time (UTC, when the consumer landed it), first/last
are the Kafka offsets it covers and the topic id names the topic's incarnation
(:mod:`tandem.streaming.topics`): offsets start again at 0 when a topic is recreated or the
in-memory embedded broker restarts, and without the id the new batches took the old files' names
and replaced them. Files are never replaced anyway (:func:`~tandem.streaming.consumer.write_once`):
a name that exists with other bytes (an id the consumer's metadata did not refresh yet, a broker
that reports no ids) makes the batch land under a suffixed name instead.

A batch is flushed at ``batch_max`` records or ``batch_ms`` after its first record, whichever
comes first.

Delivery is at-least-once with exactly-once results in the lake: a file is made durable (temp
file, fsync, hard link to its name, folder fsync) and only *then* are its offsets committed. A
crash between the two leaves a complete file whose records are read again after the restart and
land a second time (the same file, kept as it is, if the batch boundaries match, else another
file); ``jobs.ingest_events`` deduplicates by ``event_id``, so the lake ends with each event once.
Records that cannot be decoded or violate the contract, for whatever reason (see
:func:`tandem.streaming.codec.decode_event`), go to the dead-letter topic with the reason and are
not landed; the consumer keeps going. Every dead letter is acknowledged by the broker before the
batch's offsets are committed.

The serve-time feature log (``feature_log.v1`` records on ``tandem.feature_log.v1``,
:mod:`tandem.features.feature_log`) lands the same way under ``landing/feature_log/`` with
``--kind feature_log`` (its own topic and group by default), checked against its own contract.

Run: ``python -m tandem.streaming.landing_consumer --home DIR --bootstrap HOST:PORT
[--kind feature_log]``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata

from tandem.config import Paths
from tandem.features import feature_log
from tandem.streaming.codec import encode_event
from tandem.streaming.consumer import (
    StopFlag,
    StreamStats,
    command_line,
    fsync_dir,
    make_consumer,
    now_ms,
    start_process,
    write_once,
)
from tandem.streaming.dead_letter import DeadLetterWriter
from tandem.streaming.topics import EVENTS_TOPIC, topic_id
from tandem.validation import validate_event

log = logging.getLogger(__name__)

GROUP = "tandem-lake"
EVENTS, FEATURE_LOG = "events", "feature_log"
# what a landing consumer lands: its folder and the contract its records are checked against
KINDS = {EVENTS: (lambda paths: paths.landing_events, validate_event),
         FEATURE_LOG: (feature_log.landing_dir, feature_log.validate_record)}
# a feature-log lander's topic and group unless given
FEATURE_LOG_DEFAULTS = {"topic": feature_log.FEATURE_LOG_TOPIC, "group": "tandem-feature-log"}


def landing_file(root: Path, arrival: datetime, tp: TopicPartition, first: int,
                 last: int, topic_id: str | None) -> Path:
    """Where a batch of ``tp``'s offsets ``first..last`` that arrived at ``arrival`` lands."""
    topic = f"{tp.topic}-{topic_id}" if topic_id else tp.topic
    return (root / f"date={arrival:%Y-%m-%d}" / f"hour={arrival:%H}"
            / f"{topic}-{tp.partition}-{first}-{last}.jsonl")


class LandingConsumer(ConsumerRebalanceListener):
    """Consume ``topic`` and land micro-batches under ``paths.landing_events``.

    Parameters
    ----------
    paths : state root; files go to ``paths.landing_events``.
    bootstrap : broker address.
    batch_max : records per flush at most (also the poll size).
    batch_ms : a batch is flushed at most this long after its first record arrived.
    stats_path : optional JSON file with counts and freshness (file durable - produce time).
    stats_window : freshness percentiles are over the last this many records.
    """

    def __init__(self, paths: Paths, bootstrap: str, topic: str = EVENTS_TOPIC,
                 group: str = GROUP, batch_max: int = 5000, batch_ms: int = 500,
                 stats_path: Path | None = None, crash_after_files: int | None = None,
                 stats_window: int = 200_000, kind: str = EVENTS) -> None:
        root, validator = KINDS[kind]
        self.root = root(paths)
        self.batch_max = batch_max
        self.batch_ms = batch_ms
        self.buffers: dict[TopicPartition, list[ConsumerRecord]] = defaultdict(list)
        self.buffered = 0
        self.first_buffered_ms = 0
        self.rewind: dict[TopicPartition, int] = {}
        self.crash_after_files = crash_after_files
        self.files = 0
        self.stats = StreamStats(group, stats_path, stats_window)
        self.dlq = DeadLetterWriter(bootstrap, group, validator=validator)
        self.consumer = make_consumer(bootstrap, group, topic, listener=self,
                                      max_poll_records=batch_max)

    # Listener callbacks run on kafka-python's IO thread, where a blocking commit is refused; so
    # a rebalance drops the unflushed buffer instead of landing it. Whoever owns a partition next
    # re-reads it: another member from the last commit, this one from the first dropped offset
    # (kafka-python keeps the position of a partition that stays assigned, so we seek back).
    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.rewind = {tp: recs[0].offset for tp, recs in self.buffers.items() if recs}
        if self.buffered:
            log.info("rebalance: dropping %d unflushed records (re-read later)", self.buffered)
        self.buffers.clear()
        self.buffered = 0

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned & set(self.rewind):
            self.consumer.seek(tp, self.rewind[tp])
        self.rewind = {}
        log.info("assigned %s", sorted(tp.partition for tp in assigned))

    def run(self, stop: StopFlag | None = None) -> None:
        """Poll, buffer and flush until ``stop`` is set; then flush, commit and close."""
        stop = stop if stop is not None else StopFlag()  # `or` would test the flag itself
        try:
            while not stop:
                polled = self.consumer.poll(timeout_ms=100, max_records=self.batch_max)
                for tp, records in polled.items():
                    if not self.buffered:
                        self.first_buffered_ms = now_ms()
                    self.buffers[tp].extend(records)
                    self.buffered += len(records)
                if self.buffered and (self.buffered >= self.batch_max
                                      or now_ms() - self.first_buffered_ms >= self.batch_ms):
                    self.flush()
                self.stats.maybe_write()
            self.flush()
        finally:
            self.stats.maybe_write(force=True)
            self.consumer.close(autocommit=False)
            self.dlq.close()

    def flush(self) -> None:
        """Land every buffered partition durably, dead-letter the rejects, then commit."""
        if not self.buffered:
            return
        arrival = datetime.now(UTC)
        ref_ms = now_ms()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        produce_ms: list[np.ndarray] = []
        new_dirs: set[Path] = set()
        rejected = 0
        for tp, records in self.buffers.items():
            events = [self.dlq.decode(rec, ref_ms) for rec in records]
            lines = [encode_event(ev) for ev in events if ev is not None]
            rejected += len(records) - len(lines)
            first, last = records[0].offset, records[-1].offset
            if lines:
                path = landing_file(self.root, arrival, tp, first, last,
                                    topic_id(self.consumer, tp.topic))
                if not path.parent.exists():
                    new_dirs.add(path.parent)
                write_once(path, b"\n".join(lines) + b"\n")
                self.files += 1
                if self.files == self.crash_after_files:  # failpoint: landed, not committed
                    os._exit(137)
            offsets[tp] = OffsetAndMetadata(last + 1, "", -1)
            produce_ms.append(np.fromiter((r.timestamp for r in records), np.int64,
                                          len(records)))
            self.stats.add("landed", len(lines))
        for d in new_dirs:  # a new hour folder's entry in its date folder must survive too
            fsync_dir(d.parent)
            fsync_dir(d.parent.parent)
        self.dlq.confirm()  # raises if a dead letter was lost: then nothing is committed
        try:
            self.consumer.commit(offsets)
        except CommitFailedError:  # rebalanced meanwhile: the files stay, a re-read dedups
            log.warning("commit failed after landing offsets %s", offsets, exc_info=True)
        self.stats.add("dead_letters", rejected)
        self.stats.processed(np.concatenate(produce_ms), now_ms())
        self.buffers.clear()
        self.buffered = 0


def main(argv: list[str] | None = None) -> None:
    ap = command_line("Land tandem.events.v1 in the raw landing area.", GROUP)
    ap.add_argument("--batch-max", type=int, default=5000)
    ap.add_argument("--batch-ms", type=int, default=500)
    ap.add_argument("--crash-after-files", type=int, default=None,
                    help="testing: die (exit 137, no cleanup) right after landing the N-th file, "
                         "before its offsets are committed: a kill -9 at the worst moment")
    ap.add_argument("--kind", choices=sorted(KINDS), default=EVENTS,
                    help="events (landing/events) or the serve-time feature log "
                         "(landing/feature_log; topic and group default to its own)")
    if FEATURE_LOG in (argv if argv is not None else sys.argv[1:]):
        ap.set_defaults(**FEATURE_LOG_DEFAULTS)
    stop = StopFlag()
    args, paths, bootstrap = start_process(ap, argv)
    LandingConsumer(paths, bootstrap, args.topic, args.group, args.batch_max, args.batch_ms,
                    args.stats, args.crash_after_files, args.stats_window,
                    args.kind).run(stop)

if __name__ == "__main__":
    main()
