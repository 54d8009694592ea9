"""Per-variant CTR of one experiment from the event stream since a canary step began.

The canary's CTR guardrail reads Kafka, not the lake, so a ramp step is judged on the traffic it
has had up to the look, without waiting for the landing -> ingest -> daily report chain. Serving
logs its impressions (``experiment``/``variant`` set) and clients send their engagements to the
same topic (``tandem.events.v1``), keyed by user, so an impression and its clicks share a
partition.

Which records: a group-less consumer (no offsets committed, nothing shared with the landing or
feature consumers) assigned every partition, each read from ``offsets_for_times(since)`` — the
first record appended at or after the step began; a partition with none is skipped — up to the
end offsets taken at the look. tansu under-reports end offsets (:mod:`tandem.streaming.broker`),
so a partition counts as read only once it is past its reported end *and* two polls in a row
bring nothing more; on a busy topic a record appended at or after ``until`` ends its partition
instead. A deadline bounds the whole read: the look is judged on what was read by then
(``complete`` False, logged). Every record goes through
:func:`tandem.streaming.codec.decode_event`, the consumers' decoder: one that cannot be decoded
or breaks the contract is skipped and counted by reason, never raised.

One definition of CTR, the lake report's (``jobs/experiment_report.impression_rows`` and
``variant_moments``): an experiment impression is one (``request_id``, ``item_id``) with its
variant and user; it is clicked when a ``click`` with the same (``request_id``, ``item_id``) has
an event time within ``[ts, ts + ATTRIBUTION_WINDOW]``; per user ``x`` = impressions, ``y`` =
clicked impressions, reduced per variant to :class:`~tandem.experiments.stats.Moments` — the
sufficient statistics both the report's delta method and :func:`tandem.experiments.canary.decide`
use. Only the step's window differs: records appended in ``[since, until)`` (append time, the
stream's clock), where the report takes event times in whole days.

Memory model (platform: 50M events/day, 5M users): the read streams records through; what it
keeps is (a) each partition's not-yet-final impressions and early clicks, dropped once the
partition's append time passes them by the attribution window plus ``LATENESS`` (about 35
minutes of impressions, ~1M entries at peak), and (b) one (impressions, clicks) pair per user of
the experiment seen in the window (up to the 5M users a daily look at a 50% step sees, ~1 GB of
Python objects; a 1% step holds the control's users all the same). CPU: decoding is ~20 us a
record, so a day of the full topic is ~15 minutes of one core — a look is meant to run once per
step, not per minute.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from tandem import schema as s
from tandem.experiments.definitions import ATTRIBUTION_WINDOW
from tandem.experiments.stats import Moments
from tandem.security import kafka_client_kwargs
from tandem.streaming.codec import decode_event, now_ms
from tandem.streaming.topics import EVENTS_TOPIC
from tandem.validation import ContractError

log = logging.getLogger(__name__)
LATENESS_MS = 5 * 60_000  # a click appended this long after its window closed no longer counts
IDLE_POLLS = 2  # consecutive empty polls (250 ms each) before a partition past its end is read


@dataclass
class StreamCtr:
    """What one look read: CTR moments per variant and how the read went."""

    moments: dict[str, Moments] = field(default_factory=dict)
    records: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> records
    complete: bool = True

    def summary(self) -> dict[str, Any]:
        """For the canary's history: read, skipped (by reason), complete, and per variant the
        impressions and clicked impressions."""
        return {"records": self.records, "skipped": dict(self.skipped),
                "complete": self.complete,
                "impressions": {v: int(m.sx) for v, m in self.moments.items()},
                "clicks": {v: int(m.sy) for v, m in self.moments.items()}}


class _Join:
    """Impressions joined to their clicks, finalised per user as partitions move on."""

    def __init__(self, experiment: str, window_ms: int):
        self.experiment, self.window_ms = experiment, window_ms
        # (request, item) -> [variant, user, ts, clicked] of impressions not final yet
        self.pending: dict[tuple[str, str], list] = {}
        self.early: dict[tuple[str, str], list[int]] = {}  # clicks read before their impression
        self.expiry: dict[int, deque] = defaultdict(deque)  # partition -> (drop at, kind, key)
        self.users: dict[tuple[str, str], list[int]] = {}  # (variant, user) -> [imps, clicks]

    def add(self, partition: int, appended_ms: int, event: dict[str, Any]) -> None:
        self._expire(partition, appended_ms)
        kind, request = event[s.EVENT_TYPE], event.get(s.REQUEST_ID)
        if request is None or kind not in (s.IMPRESSION, s.CLICK):
            return
        key, ts = (request, event[s.ITEM_ID]), event[s.TS]
        drop_at = appended_ms + self.window_ms + LATENESS_MS
        if kind == s.CLICK:
            if key in self.pending:
                self._click(self.pending[key], ts)
            else:
                self.early.setdefault(key, []).append(ts)
                self.expiry[partition].append((drop_at, "click", key))
        elif (event.get(s.EXPERIMENT) == self.experiment and event.get(s.VARIANT)
              and key not in self.pending):
            entry = [event[s.VARIANT], event[s.USER_ID], ts, 0]
            for click_ts in self.early.pop(key, ()):
                self._click(entry, click_ts)
            self.pending[key] = entry
            self.expiry[partition].append((drop_at, "impression", key))

    def _click(self, entry: list, click_ts: int) -> None:
        if entry[2] <= click_ts <= entry[2] + self.window_ms:
            entry[3] = 1

    def _expire(self, partition: int, appended_ms: int) -> None:
        queue = self.expiry[partition]
        while queue and queue[0][0] <= appended_ms:
            _, kind, key = queue.popleft()
            if kind == "click":
                self.early.pop(key, None)
            elif (entry := self.pending.pop(key, None)) is not None:
                self._final(entry)

    def _final(self, entry: list) -> None:
        acc = self.users.setdefault((entry[0], entry[1]), [0, 0])
        acc[0] += 1
        acc[1] += entry[3]

    def moments(self) -> dict[str, Moments]:
        for entry in self.pending.values():
            self._final(entry)
        self.pending.clear()
        per: dict[str, list[list[int]]] = defaultdict(list)
        for (variant, _), acc in self.users.items():
            per[variant].append(acc)
        return {v: Moments.of(*np.asarray(rows, np.float64).T) for v, rows in per.items()}


def read_ctr(bootstrap: str, experiment: str, since: datetime, until: datetime,
             topic: str = EVENTS_TOPIC, timeout_s: float = 600.0,
             window_ms: int = int(ATTRIBUTION_WINDOW.total_seconds() * 1000)) -> StreamCtr:
    """Per-variant CTR moments of ``experiment`` over the records appended to ``topic`` in
    ``[since, until)`` (module docstring)."""
    since_ms, until_ms = int(since.timestamp() * 1000), int(until.timestamp() * 1000)
    out, join = StreamCtr(), _Join(experiment, window_ms)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             client_id="tandem-canary", enable_auto_commit=False,
                             fetch_max_wait_ms=100, max_partition_fetch_bytes=4 * 1024 * 1024,
                             **kafka_client_kwargs())
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                        or ())]
        ends = consumer.end_offsets(tps)
        starts = consumer.offsets_for_times({tp: since_ms for tp in tps})
        # none at or after ``since``: Kafka answers None, tansu offset 0 with timestamp -1
        active = {tp for tp in tps if starts.get(tp) is not None and starts[tp].timestamp >= 0}
        consumer.assign(sorted(active, key=lambda tp: tp.partition))
        for tp in active:
            consumer.seek(tp, starts[tp].offset)
        deadline, empty = time.monotonic() + timeout_s, 0
        while active:
            if time.monotonic() > deadline:
                out.complete = False
                log.warning("%s: stream read stopped at its %.0f s deadline with %d partitions "
                            "unfinished", experiment, timeout_s, len(active))
                break
            polled = consumer.poll(timeout_ms=250, max_records=10_000)
            for tp, records in polled.items():
                if tp in active:
                    _read(tp, records, (since_ms, until_ms), join, out, active, consumer)
            empty = 0 if polled else empty + 1
            if empty >= IDLE_POLLS:
                caught_up = {tp for tp in active if consumer.position(tp) >= ends[tp]}
                active -= caught_up
                consumer.pause(*caught_up)
    finally:
        consumer.close(autocommit=False)
    out.moments = join.moments()
    if out.skipped:
        log.warning("%s: skipped %d undecodable or invalid records: %s", experiment,
                    sum(out.skipped.values()), dict(out.skipped))
    return out


def _read(tp: TopicPartition, records: list, window: tuple[int, int], join: _Join,
          out: StreamCtr, active: set[TopicPartition], consumer: KafkaConsumer) -> None:
    """Feed one polled batch of ``tp`` (records appended in ``window`` = [since, until) ms);
    a record appended at or after ``until`` ends the partition."""
    reference = now_ms()
    for record in records:
        if record.timestamp >= window[1]:
            active.discard(tp)
            consumer.pause(tp)
            return
        if record.timestamp < window[0]:  # an out-of-order create time from before the step
            continue
        out.records += 1
        try:
            event = decode_event(record.value, reference)
        except ContractError as err:
            out.skipped[err.reason] += 1
            continue
        join.add(tp.partition, record.timestamp, event)
