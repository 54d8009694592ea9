"""The ranker's fast online path: serving never calls Feast per candidate.

:class:`ItemFeatureTable` holds the catalog's item features as columnar numpy arrays loaded from
the online store at model load (``refresh()`` after each materialization), and
:func:`fetch_user_features` reads only the user's rows (profile, activity, session) with a
deadline, falling back to defaults. The repo steps that fill the store are in
:mod:`tandem.features.feature_store`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from tandem import schema as s
from tandem.features import entity as F
from tandem.features.feature_store import ITEM_REFS, USER_REFS

_USER_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tandem-user-features")


def _online_columns(store, refs: Sequence[str], key: str, ids: Sequence[str]) -> dict:
    rows = [{key: i} for i in ids]
    return store.get_online_features(features=list(refs), entity_rows=rows).to_dict()


class ItemFeatureTable:
    """The catalog's item features as columnar arrays, indexed by catalog row.

    Parameters
    ----------
    store : FeatureStore
    item_ids : [N] item ids in catalog order (row ``i`` of every array is ``item_ids[i]``)
    batch_size : ids per online read when loading

    Attributes
    ----------
    static : [N, len(ITEM_FEATURES)] float32, the time columns left at 0
    last_event_ts, created_at : [N] float64 epoch ms, for the time columns at ``take`` time
    """

    def __init__(self, store, item_ids: Sequence[str], batch_size: int = 5000):
        self._store = store
        self.item_ids = np.asarray(item_ids, dtype=object)
        self._batch = batch_size
        self._lock = threading.Lock()
        self.refresh()

    def __len__(self) -> int:
        return len(self.item_ids)

    def refresh(self) -> None:
        """Reload every item's row from the online store (after each materialization).

        The new arrays replace the old ones in one assignment, so concurrent ``take`` calls see
        either the old table or the new one, never a mix.
        """
        parts = [_online_columns(self._store, ITEM_REFS, s.ITEM_ID,
                                 list(self.item_ids[i:i + self._batch]))
                 for i in range(0, len(self.item_ids), self._batch)]
        cols = {f.name: [v for p in parts for v in p[f.name]] for f in F.ITEM_FIELDS}
        with self._lock:
            self._arrays = F.item_static_matrix(cols)

    @property
    def static(self) -> np.ndarray:
        return self._arrays[0]

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(static, last_event_ts, created_at) of the last load, one consistent snapshot."""
        return self._arrays

    def take(self, idx: np.ndarray, now_ms) -> np.ndarray:
        """Item features [len(idx), len(ITEM_FEATURES)] float32 of catalog rows ``idx`` at now."""
        static, last_ts, created = self._arrays
        return F.fill_item_times(static[idx], last_ts[idx], created[idx], now_ms)


class UserRowReader:
    """One user's ``USER_REFS`` values straight from the online store, one ``online_read`` per
    view: the per-request read of serving.

    ``get_online_features`` plans the request (feature refs, entity keys, on-demand views) and
    builds a protobuf response on every call: 0.77 ms of CPU (and GIL) per user on the 1M-item
    bench store, against 0.24 ms for the same rows read here. The values are the SDK's (the
    same ``online_read`` of the configured online store, the same value conversion, no TTL
    filter in either, Feast 0.67); a test compares both.
    """

    def __init__(self, store):
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type

        self._entity_key, self._value = EntityKey, Value
        self._to_python = feast_value_type_to_python_type
        self._config = store.config
        self._provider = store._get_provider()  # the online store behind get_online_features
        by_view: dict[str, list[str]] = {}
        for ref in USER_REFS:
            view, _, name = ref.partition(":")
            by_view.setdefault(view, []).append(name)
        self._views = [(store.get_feature_view(v), names) for v, names in by_view.items()]

    def read(self, user_id: str) -> dict:
        """{feature name: value or None} for every ``USER_REFS`` feature."""
        key = self._entity_key(join_keys=[s.USER_ID],
                               entity_values=[self._value(string_val=user_id)])
        out = {name: None for _, names in self._views for name in names}
        for view, names in self._views:
            # a copy: Feast's Redis store appends "_ts:<view>" to the list it is given (0.67),
            # which grew the shared list by one name per read
            _, values = self._provider.online_read(config=self._config, table=view,
                                                   entity_keys=[key],
                                                   requested_features=list(names))[0]
            for name in names:
                if values and name in values:
                    out[name] = self._to_python(values[name])
        return out


def bound_read_timeout(store, timeout_s: float) -> None:
    """Bound how long one online read can block: Redis ``socket_timeout`` and
    ``socket_connect_timeout`` (unless the connection string sets them), SQLite's busy timeout
    (default 5 s while a materialization holds the write lock).

    Serving abandons a read at its deadline, but the thread doing it stays blocked until the
    store answers: without these bounds a hung store keeps every store thread blocked for good.
    """
    online = store._get_provider().online_store
    kind = store.config.online_store.type
    if kind == "redis":
        client = online._get_client(store.config.online_store)
        pool = getattr(client, "connection_pool", None)  # None: a cluster client (not bounded)
        if pool is not None:
            for key in ("socket_timeout", "socket_connect_timeout"):
                if pool.connection_kwargs.get(key) is None:
                    pool.connection_kwargs[key] = timeout_s
            pool.disconnect()  # connections made before now reconnect with the bounds
    elif kind == "sqlite":
        online._get_conn(store.config).execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")


_READERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> its reader


def user_row_reader(store) -> UserRowReader:
    """The :class:`UserRowReader` of ``store`` (built once: it resolves the views)."""
    reader = _READERS.get(store)
    if reader is None:
        reader = _READERS[store] = UserRowReader(store)
    return reader


def fetch_user_features(store, user_id: str,
                        deadline_s: float | None = 0.025) -> tuple[dict, bool]:
    """One user's raw profile, activity and session row, or defaults.

    Parameters
    ----------
    deadline_s : the read runs on a worker thread and is abandoned after this long; None reads
        in the calling thread (no thread hop, no deadline; for stores with their own timeouts,
        e.g. Redis ``socket_timeout``).

    Returns
    -------
    values : {field name: value} for ``USER_FIELDS + SESSION_FIELDS``; a missing user or value
        holds its default (``tandem.features.entity``), ready for ``user_vector`` /
        ``session_vector``.
    ok : False when the store failed or missed ``deadline_s`` (values are then all defaults).
    """
    try:
        read = user_row_reader(store).read
        if deadline_s is None:
            row = read(user_id)
        else:
            row = _USER_POOL.submit(read, user_id).result(timeout=deadline_s)
        ok = True
    except (FutureTimeout, Exception):  # serving degrades to defaults; the caller counts ok
        row, ok = {}, False
    values = F.default_row(F.USER_FIELDS + F.SESSION_FIELDS)
    values.update({k: v for k, v in row.items() if k in values and v is not None})
    return values, ok
