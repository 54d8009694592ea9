"""The query history at time t: which of a user's past items the models are asked with.

Serving asks the two-tower (user tower and session centroid), the sequence model, the ALS
fold-in, the content source and the ranker's recency features with the user's recent items;
training and ``make eval`` must ask with the same items, or the models learn from one kind of
history and are served another (training-serving skew). One definition, here:

    the user's last :data:`QUERY_LEN` DISTINCT items with an engagement -- any event type but
    those in :data:`NOT_ENGAGEMENT` (impression, dislike) -- strictly before ``t``, ordered by
    each item's latest such engagement, newest first.

Where each side gets it:

- serving: the session row's ``recent_item_ids``, which the feature consumer folds event by event
  with this rule (``tandem.streaming.session_state``), behind the request's own session items
  (:func:`request_history`);
- training from events (``make eval``, the ranker's recency features): :func:`query_items`;
- training from the nightly table (one row per (user, item) pair, ``engaged_ts`` = the pair's
  first engagement in the window, ``jobs/build_training_table.py``): :func:`query_items` on the
  pairs for a request at ``t``, :func:`histories_before` for every training example at once.
  One timestamp per pair orders an item by its FIRST engagement in the window where serving
  orders it by its latest: the two differ only for an item engaged again later (a click and a
  like seconds apart keep their place), the price of a table that is linear in pairs.

Ties in time (ratings given in the same second) are broken by item row, higher first; a stream
folds them in arrival order.
"""

from __future__ import annotations

import numpy as np

from tandem import schema as s

QUERY_LEN = 20  # items the session row keeps, and so the most any model is queried with
NOT_ENGAGEMENT = frozenset({s.IMPRESSION, s.DISLIKE})
PAD = -1  # an empty slot (tandem.models.two_tower.PAD, tandem.models.sequence.PAD)


def is_engagement(event_types) -> np.ndarray:
    """bool [n]: the events that enter a query history (every type but :data:`NOT_ENGAGEMENT`)."""
    return ~np.isin(np.asarray(event_types, dtype=object), list(NOT_ENGAGEMENT))


def request_history(rows: np.ndarray) -> np.ndarray:
    """A request's query: catalog ``rows`` of its session items then the session row's
    ``recent_item_ids`` (newest first; unknown ids already dropped), distinct, the newest
    :data:`QUERY_LEN`."""
    rows = np.asarray(rows, dtype=np.int64)
    _, first = np.unique(rows, return_index=True)
    return rows[np.sort(first)][:QUERY_LEN]


def query_items(users: np.ndarray, items: np.ndarray, ts: np.ndarray, m: int,
                n: int = QUERY_LEN) -> np.ndarray:
    """int32 ``[m, n]``: each user's query history, newest first, ``PAD``-filled.

    Parameters
    ----------
    users, items, ts : [e] engagement events (already filtered with :func:`is_engagement`) or
        pairs with their engagement time; ``users`` are rows ``< m``
    n : items kept per user (at most :data:`QUERY_LEN` for a served model)
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.int64)
    # each (user, item) once, at its latest engagement
    order = np.lexsort((ts, items, users))
    u, it, t = users[order], items[order], ts[order]
    last = np.r_[(u[1:] != u[:-1]) | (it[1:] != it[:-1]), True][:len(u)]
    u, it, t = u[last], it[last], t[last]
    order = np.lexsort((-it, -t, u))
    u, it = u[order], it[order]
    start = np.r_[0, np.flatnonzero(np.diff(u)) + 1] if len(u) else np.zeros(0, np.int64)
    pos = np.arange(len(u)) - np.repeat(start, np.diff(np.r_[start, len(u)]))
    out = np.full((m, n), PAD, dtype=np.int32)
    keep = pos < n
    out[u[keep], pos[keep]] = it[keep]
    return out


def histories_before(users: np.ndarray, items: np.ndarray, ts: np.ndarray,
                     q_users: np.ndarray, q_items: np.ndarray, q_ts: np.ndarray, n: int
                     ) -> np.ndarray:
    """int32 ``[len(q_users), n]``: for each training example (user, target item, time), the
    user's query history at that time -- :func:`query_items` of one request per example,
    without the target itself (serving never recommends an item of its query).

    ``users, items, ts`` are distinct (user, item) pairs with one engagement time each (the
    table's ``engaged_ts``). Vectorised: one sort of the pairs, one ``searchsorted`` of the
    examples, ``n + 1`` gathers; memory ``len(q) x (n + 1)`` int32.
    """
    users = np.asarray(users, dtype=np.int64)
    q_users = np.asarray(q_users, dtype=np.int64)
    # times as dense ranks, so that (user, time) packs into one sortable int64 key
    _, inverse = np.unique(np.r_[np.asarray(ts, np.int64), np.asarray(q_ts, np.int64)],
                           return_inverse=True)
    rank, q_rank = inverse[:len(users)], inverse[len(users):]
    order = np.lexsort((np.asarray(items), rank, users))  # oldest first; ties: item ascending
    keys = (users[order] << 32) + rank[order]
    it = np.asarray(items, dtype=np.int32)[order]
    first = np.searchsorted(keys, q_users << 32)  # the user's first pair
    end = np.searchsorted(keys, (q_users << 32) + q_rank)  # one past the last pair before t
    found = np.full((len(q_users), n + 1), PAD, dtype=np.int32)
    for k in range(1, n + 2):
        ok = end - k >= first
        found[ok, k - 1] = it[end[ok] - k]
    found[found == np.asarray(q_items, dtype=np.int32)[:, None]] = PAD
    # squeeze the removed target out: items keep their order, PADs go last
    found = np.take_along_axis(found, np.argsort(found < 0, axis=1, kind="stable"), axis=1)
    return found[:, :n]
