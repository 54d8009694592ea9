"""Real-time session features from the event stream (group ``tandem-features``).

For every poll: decode and validate the records, judged at the poll's wall-clock time as the lake
judges them (a ``ts`` from the future would pin a session; rejects go to the dead-letter topic,
acknowledged before the offsets can be saved), drop the events whose ``event_id`` was seen
within the last session gap (:mod:`tandem.streaming.dedup`: the lake deduplicates the same way),
fold each event into its user's :class:`~tandem.streaming.session_state.SessionState`, then
push one row per changed user to the Feast push source ``user_session_push`` (online store), up
to ``push_rows`` rows per call. Freshness is measured per event as *push returned* minus the
record's produce timestamp.

Restart after ``kill -9`` converges to the same state, because state and offsets are saved
together: every ``snapshot_ms`` (and on rebalance or shutdown) each owned partition's states and
its next offset are written to one file, ``<home>/kafka/state/<group>/<topic>-<partition>.json``,
atomically (temp, fsync, rename), with the topic id the offset belongs to and the recent event
ids. On assignment the consumer loads that file and seeks to its offset (offset 0 without one, or
when the topic id differs: the topic was recreated and counts from 0 again), ignoring the group's
committed offset, so it replays exactly the events after the snapshot. The fold is deterministic
and pushes are upserts keyed by user, so the replay re-pushes the same rows and the online store
ends where an uninterrupted run would. Users live in one partition (records are keyed by
user_id), so a partition's file is self-contained and the partition can move to another group
member. Offsets are committed to Kafka after each snapshot too, for lag tools only.

SIGTERM/SIGINT stop it within about a second, even while it catches up on a backlog: rows are
pushed in chunks of ``push_rows`` with a stop check before each, and a push waiting for the Feast
store to open (seconds, a minute on a loaded machine) gives up when the stop comes. A batch cut
short that way is abandoned: the state folded since the last snapshot is dropped, not saved, so
the next start replays it (the replay re-pushes the rows already pushed: the same upserts). A
batch that completes is saved with a final snapshot as before.

Run: ``python -m tandem.streaming.feature_consumer --home DIR --bootstrap HOST:PORT``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from tandem import schema as s
from tandem.config import Paths
from tandem.streaming.consumer import (
    StopFlag,
    Stopping,
    StreamStats,
    command_line,
    durable_write,
    in_daemon_thread,
    make_consumer,
    now_ms,
    start_process,
)
from tandem.streaming.dead_letter import DeadLetterWriter
from tandem.streaming.dedup import RecentEventIds
from tandem.streaming.session_state import SessionState, apply_event, session_frame
from tandem.streaming.topics import EVENTS_TOPIC, topic_id

log = logging.getLogger(__name__)

GROUP = "tandem-features"
Sink = Callable[[pd.DataFrame], None]


def load_item_genres(paths: Paths) -> dict[str, list[str]]:
    """item_id -> genres from the lake catalog (empty when there is no catalog yet)."""
    if not paths.items.exists() or not any(paths.items.rglob("*.parquet")):
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(paths.items, columns=[s.ITEM_ID, s.GENRES])
    return {i: list(g or ()) for i, g in zip(table[s.ITEM_ID].to_pylist(),
                                            table[s.GENRES].to_pylist(), strict=True)}


def feast_sink(paths: Paths, stop: StopFlag | None = None) -> Sink:
    """Push rows to ``SESSION_PUSH_SOURCE``'s online store in the Feast repo of ``paths``
    (applied beforehand by ``tandem.features.feature_store.apply``) and append the same rows to the
    session source's parquet folder (``lake/features/session``), which the ranker's training
    joins point-in-time: training sees the session values serving saw, not defaults. A replay
    after a crash appends the replayed rows again; they repeat (user, event_timestamp, values),
    so the point-in-time join picks the same values.

    Importing Feast takes seconds: the store opens in a daemon thread, overlapping the
    consumer-group join. A push waits for it, but raises :class:`Stopping` when ``stop`` is set
    meanwhile, and the daemon thread does not hold up the exit."""
    from tandem.features.feature_store import open_store, push_session, session_source_path

    store = in_daemon_thread(open_store, paths)
    offline = session_source_path(paths)

    def push(frame: pd.DataFrame) -> None:
        if not store.done():
            log.info("the first push waits for the Feast store to open")
        push_session(stop.result(store) if stop is not None else store.result(), frame,
                     offline_dir=offline)

    return push


def state_dir(paths: Paths, group: str) -> Path:
    return paths.kafka / "state" / group


class FeatureConsumer(ConsumerRebalanceListener):
    """Maintain per-user session state per owned partition and push changed rows online.

    Parameters
    ----------
    paths : state root (snapshots under ``paths.kafka``; the catalog for item genres).
    bootstrap : broker address.
    sink : called with the changed users' rows of a poll, a DataFrame of at most ``push_rows``
        rows per call (Feast push by default).
    snapshot_ms : how often state + offsets are saved (bounds the replay after a crash).
    stop : set by SIGTERM/SIGINT (a new :class:`StopFlag` by default); checked before each
        chunk of ``push_rows`` rows, so a stop during a long catch-up push is prompt.
    stats_path, stats_window : optional JSON file with counts and freshness (push returned -
        produce time), percentiles over the last ``stats_window`` records.
    """

    def __init__(self, paths: Paths, bootstrap: str, sink: Sink, topic: str = EVENTS_TOPIC,
                 group: str = GROUP, snapshot_ms: int = 5000, max_poll: int = 5000,
                 stats_path: Path | None = None, stats_window: int = 200_000,
                 stop: StopFlag | None = None, push_rows: int = 1000) -> None:
        self.sink = sink
        self.snapshot_ms = snapshot_ms
        self.max_poll = max_poll
        self.stop = stop if stop is not None else StopFlag()
        self.push_rows = push_rows
        self.dir = state_dir(paths, group)
        self.item_genres = load_item_genres(paths)
        self.states: dict[TopicPartition, dict[str, SessionState]] = {}
        self.next_offset: dict[TopicPartition, int] = {}
        self.recent: dict[TopicPartition, RecentEventIds] = {}
        self.last_snapshot_ms = now_ms()
        self.stats = StreamStats(group, stats_path, stats_window)
        self.dlq = DeadLetterWriter(bootstrap, group)
        self.consumer = make_consumer(bootstrap, group, topic, listener=self,
                                      max_poll_records=max_poll)

    def _file(self, tp: TopicPartition) -> Path:
        return self.dir / f"{tp.topic}-{tp.partition}.json"

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            path = self._file(tp)
            self.states[tp], self.next_offset[tp], self.recent[tp] = {}, 0, RecentEventIds()
            if path.exists():
                snap = json.loads(path.read_text())
                self.states[tp] = {u: SessionState.from_json(v)
                                   for u, v in snap["users"].items()}
                self.recent[tp] = RecentEventIds(ids=snap.get("recent_ids"))
                current = topic_id(self.consumer, tp.topic)
                if snap.get("topic_id") and current and snap["topic_id"] != current:
                    # a recreated topic: its offsets count from 0 again, and seeking to the old
                    # offset would skip that many new events; the users' states still hold
                    log.warning("%s is a new incarnation (%s, snapshot of %s): from offset 0",
                                tp, current, snap["topic_id"])
                else:
                    self.next_offset[tp] = snap["offset"]
            self.consumer.seek(tp, self.next_offset[tp])
        log.info("assigned %s at %s", sorted(tp.partition for tp in assigned),
                 {tp.partition: self.next_offset[tp] for tp in assigned})

    # Listener callbacks run on kafka-python's IO thread: no blocking client calls (commit) here.
    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        try:
            self.snapshot(revoked, commit=False)
        except Exception:  # the next owner replays from the last good snapshot
            log.exception("snapshot on revoke failed")
        for tp in revoked:
            self.states.pop(tp, None)
            self.next_offset.pop(tp, None)
            self.recent.pop(tp, None)

    def abandon(self) -> None:
        """Forget every partition's state: it holds events not (all) pushed yet. Closing the
        consumer revokes its partitions, and the revoke callback saves what is left; with
        nothing left the snapshot on disk stays the last consistent one, and whoever owns a
        partition next replays from it."""
        log.info("stopped mid-batch: state past the last snapshot is dropped (replayed later)")
        self.states.clear()
        self.next_offset.clear()
        self.recent.clear()

    def snapshot(self, tps: set[TopicPartition] | None = None, commit: bool = True) -> None:
        """Save state + next offset of ``tps`` (all owned by default), then commit the offsets."""
        tps = set(self.states) if tps is None else tps & set(self.states)
        for tp in tps:
            users = {u: st.to_json() for u, st in self.states[tp].items()}
            self.recent[tp].prune()
            data = json.dumps({"offset": self.next_offset[tp],
                               "topic_id": topic_id(self.consumer, tp.topic), "users": users,
                               "recent_ids": self.recent[tp].ids})
            durable_write(self._file(tp), data.encode())
        self.last_snapshot_ms = now_ms()
        if tps and commit:
            try:
                self.consumer.commit({tp: OffsetAndMetadata(self.next_offset[tp], "", -1)
                                      for tp in tps})
            except Exception:  # informational only; the snapshot is the source of truth
                log.warning("offset commit failed", exc_info=True)

    def process(self, polled: Mapping[TopicPartition, list]) -> None:
        """Fold one poll's records into state and push the changed users' rows, ``push_rows`` at
        a time; :class:`Stopping` when a stop comes first (state is then ahead of the pushes)."""
        changed: dict[str, SessionState] = {}
        produce_ms = []
        rejected = duplicates = 0
        ref_ms = now_ms()
        for tp, records in polled.items():
            states, recent = self.states.get(tp), self.recent.get(tp)
            if states is None or recent is None:  # revoked during this poll
                continue
            for rec in records:
                produce_ms.append(rec.timestamp)
                ev = self.dlq.decode(rec, ref_ms)
                if ev is None:
                    rejected += 1
                    continue
                if recent.is_duplicate(ev[s.EVENT_ID], ev[s.TS]):
                    duplicates += 1
                    continue
                uid = ev[s.USER_ID]
                changed[uid] = states[uid] = apply_event(states.get(uid), ev, self.item_genres)
            self.next_offset[tp] = records[-1].offset + 1
        frame = session_frame(changed)
        for lo in range(0, len(frame), self.push_rows):
            self.stop.check()
            self.sink(frame.iloc[lo:lo + self.push_rows])
        self.dlq.confirm()  # before a snapshot can save (and commit) these offsets
        self.stats.add("pushed_rows", len(changed))
        self.stats.add("dead_letters", rejected)
        self.stats.add("duplicates", duplicates)
        self.stats.processed(np.asarray(produce_ms, dtype=np.int64), now_ms())

    def run(self) -> None:
        """Poll and process until stopped; snapshot every ``snapshot_ms`` and at exit (unless
        the stop cut a batch short: then nothing past the last snapshot is saved)."""
        try:
            while not self.stop:
                polled = self.consumer.poll(timeout_ms=100, max_records=self.max_poll)
                if polled:
                    self.process(polled)
                if now_ms() - self.last_snapshot_ms >= self.snapshot_ms:
                    self.snapshot()
                self.stats.maybe_write()
            self.snapshot()
        except Stopping:
            self.abandon()
        finally:
            self.stats.maybe_write(force=True)
            self.consumer.close(autocommit=False)
            self.dlq.close()


def main(argv: list[str] | None = None) -> None:
    ap = command_line("Session features from tandem.events.v1 to Feast.", GROUP)
    ap.add_argument("--snapshot-ms", type=int, default=5000)
    stop = StopFlag()
    args, paths, bootstrap = start_process(ap, argv)
    FeatureConsumer(paths, bootstrap, feast_sink(paths, stop), args.topic, args.group,
                    args.snapshot_ms, stats_path=args.stats, stats_window=args.stats_window,
                    stop=stop).run()

if __name__ == "__main__":
    main()
