"""Precomputed feeds for heavy users: stored next to their features, served while still valid.

The hourly job (``serving.precompute_feeds``) runs the serving engine itself for the most
active users and stores each top-N feed in the online store (Redis key ``tandem:feed:<user>``,
or a ``tandem_feeds`` table in the SQLite online store file) with the model version, a key of
the serving config, the time it was computed and the user's session mark at that time.

A request may take the stored feed (:func:`usable`) only when all of these hold, else it is
computed as usual:

- the feed was computed by the engine version answering now (a model swap invalidates every
  feed at once) with the same ranking knobs (:func:`config_key`, an A/B variant that overrides
  them computes);
- it is younger than ``MAX_AGE_MS``;
- the user's session is unchanged since: the feature consumer rewrites the session row on
  every event, so its ``(session_last_ts, session_length)`` (:func:`session_mark`), read by the
  same online-store read as the user's features, differs once a session event has arrived
  since the feed was computed; a request carrying session items of its own also computes;
- after the live filters (the session's recent items and the request's excluded items),
  at least ``k`` items remain.

The stored feed ignores the request's device and hour (features the ranker sees): a heavy
user's feed is ranked at compute time for an unknown device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.config import ServingConfig
from serving.stores import OnlineStore, UserRows
from serving.validation import RecommendQuery
from tandem import schema as s

log = logging.getLogger(__name__)

MAX_AGE_MS = 2 * 3_600_000  # an hourly job, plus one missed run
KEY_PREFIX = "tandem:feed:"
# knobs that do not change which items a feed holds (deadlines, breaker, ranker backend, where
# this deployment keeps its files, how many rows it logs): a server started with its own paths
# must still accept the feeds the hourly job stored (with them in the key, none ever matched)
_NOT_RANKING = {"online_store_timeout_ms", "rank_deadline_ms", "ranker_backend",
                "store_breaker_failures", "store_breaker_cooldown_s", "max_k", "deltas_dir",
                "feature_log_share"}


@dataclass(frozen=True)
class Feed:
    """One user's stored feed: items best first, with their scores and source masks."""

    item_ids: tuple[str, ...]
    scores: tuple[float, ...]
    source_masks: tuple[int, ...]
    model_version: str
    config: str
    computed_at_ms: int
    session: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Feed:
        raw = json.loads(text)
        return cls(**{**raw, **{k: tuple(raw[k]) for k in ("item_ids", "scores",
                                                           "source_masks")}})


@functools.lru_cache(maxsize=64)
def config_key(cfg: ServingConfig) -> str:
    """The ranking knobs of ``cfg`` as a string (feeds are valid for equal keys only)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_RANKING}
    return json.dumps(fields, sort_keys=True)


def session_mark(session: Mapping[str, Any] | None) -> str:
    """What changes in the user's session row with every event the feature consumer applies."""
    if not session:
        return ""
    return f"{session.get(s.SESSION_LAST_TS)}:{session.get(s.SESSION_LENGTH)}"


def usable(feed: Feed | None, version: str, cfg: ServingConfig, q: RecommendQuery,
           session: Mapping[str, Any] | None, now_ms: int) -> bool:
    """Whether ``feed`` may answer ``q`` now (see the module docstring)."""
    return (feed is not None and feed.model_version == version
            and feed.config == config_key(cfg) and not q.session_item_ids
            and 0 <= now_ms - feed.computed_at_ms <= MAX_AGE_MS
            and feed.session == session_mark(session))


# ------------------------------------------------------------------------------ storage

class RedisFeeds:
    """Feeds as Redis strings (``KEY_PREFIX + user_id``), expiring after ``MAX_AGE_MS``."""

    def __init__(self, client):
        self.client = client

    def get(self, user_id: str) -> Feed | None:
        raw = self.client.get(KEY_PREFIX + user_id)
        return None if raw is None else Feed.from_json(raw)

    def put(self, feeds: Mapping[str, Feed]) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            for user_id, feed in feeds.items():
                pipe.set(KEY_PREFIX + user_id, feed.to_json(), px=MAX_AGE_MS)
            pipe.execute()


class SqliteFeeds:
    """Feeds in a ``tandem_feeds`` table of the SQLite online store file (one connection per
    thread: reads run on the engine's store threads)."""

    def __init__(self, path: Path, timeout_s: float = 5.0):
        self.path, self.timeout_s = str(path), timeout_s
        self._local = threading.local()
        with self._conn() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS tandem_feeds "
                         "(user_id TEXT PRIMARY KEY, feed TEXT NOT NULL)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = sqlite3.connect(self.path, timeout=self.timeout_s)
        return conn

    def get(self, user_id: str) -> Feed | None:
        row = self._conn().execute("SELECT feed FROM tandem_feeds WHERE user_id = ?",
                                   (user_id,)).fetchone()
        return None if row is None else Feed.from_json(row[0])

    def put(self, feeds: Mapping[str, Feed]) -> None:
        with self._conn() as conn:
            conn.executemany("INSERT OR REPLACE INTO tandem_feeds VALUES (?, ?)",
                             [(u, f.to_json()) for u, f in feeds.items()])


def open_feeds(feature_store) -> RedisFeeds | SqliteFeeds:
    """The feed storage inside ``feature_store``'s online store (Redis or SQLite)."""
    config = feature_store.config.online_store
    if config.type == "redis":
        online = feature_store._get_provider().online_store
        return RedisFeeds(online._get_client(config))
    if config.type == "sqlite":
        path = Path(config.path)
        return SqliteFeeds(path if path.is_absolute() else Path(feature_store.repo_path) / path)
    raise ValueError(f"no feed storage for online store {config.type!r}")


class WithFeeds:
    """An online store whose rows carry the user's stored feed (``UserRows.feed``).

    The feed is read right after the user's rows, on the same store thread and under the same
    deadline; a failed feed read only means no feed (the request is computed)."""

    def __init__(self, store: OnlineStore, feeds: RedisFeeds | SqliteFeeds):
        self.store, self.feeds = store, feeds

    def fetch(self, user_id: str) -> UserRows:
        rows = self.store.fetch(user_id)
        try:
            feed = self.feeds.get(user_id)
        except Exception:  # noqa: BLE001 - a feed is an optimisation, never a failure
            log.exception("precomputed feed read failed")
            feed = None
        return dataclasses.replace(rows, feed=feed) if feed is not None else rows
