"""Entity feature rows at a request's time, derived from the history in memory.

User, item and session rows carry the raw fields the feature store holds (counts over the
``WINDOWS_MS`` windows, last event, genre shares); :mod:`tandem.features.entity` transforms them
exactly as it transforms stored rows. Item rows come from
:class:`tandem.data.item_events.ItemEvents` (four numpy columns, binary searches per window).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from tandem import schema as S
from tandem.data import item_events as IE
from tandem.data.dataset import positives
from tandem.evaluation.protocol import WINDOWS_MS, Catalog, _indexed
from tandem.features import entity as F
from tandem.features import query_history as QH


def _window_counts(keys: np.ndarray, ts: np.ndarray, weights: np.ndarray | None,
                   q_keys: np.ndarray, q_ts: np.ndarray, window_ms: float | None
                   ) -> np.ndarray:
    """Per query, sum of ``weights`` (or count) of events with the same key and ts in
    [q_ts - window, q_ts). Events must be sorted by (key, ts); keys are ints < 2**21."""
    comp = keys.astype(np.int64) * (1 << 42) + ts.astype(np.int64)
    hi = np.searchsorted(comp, q_keys.astype(np.int64) * (1 << 42) + q_ts, side="left")
    lo_ts = q_ts - (window_ms if window_ms is not None else (1 << 42))
    lo = np.searchsorted(comp, q_keys.astype(np.int64) * (1 << 42) + np.maximum(lo_ts, 0),
                         side="left")
    if weights is None:
        return (hi - lo).astype(np.float64)
    cum = np.r_[0.0, np.cumsum(weights, dtype=np.float64)]
    return cum[hi] - cum[lo]


def user_rows(history: pd.DataFrame, catalog: Catalog, rows: np.ndarray, now_ms: np.ndarray,
              play_dwell_ms: int | None) -> pd.DataFrame:
    """Raw user feature rows (``features.USER_FIELDS``) for user ``rows`` as of ``now_ms``."""
    hist = _indexed(history, catalog)
    hist = hist[hist[S.EVENT_TYPE] != S.IMPRESSION]
    hist = hist.sort_values(["user_idx", S.TS], kind="stable")
    keys, ts = hist["user_idx"].to_numpy(), hist[S.TS].to_numpy(np.int64)
    pos = positives(hist, play_dwell_ms).astype(np.float64)
    is_rating = (hist[S.EVENT_TYPE] == S.RATING).to_numpy()
    value = np.where(is_rating, pd.to_numeric(hist[S.VALUE], errors="coerce").fillna(0.0), 0.0)
    out = {f"user_events_{w}": _window_counts(keys, ts, None, rows, now_ms, ms)
           for w, ms in WINDOWS_MS.items()}
    out["user_events_total"] = _window_counts(keys, ts, None, rows, now_ms, None)
    out["user_positives_7d"] = _window_counts(keys, ts, pos, rows, now_ms, WINDOWS_MS["7d"])
    n_ratings = _window_counts(keys, ts, is_rating.astype(float), rows, now_ms, None)
    sum_ratings = _window_counts(keys, ts, value, rows, now_ms, None)
    out["user_ratings_total"] = n_ratings
    out["user_avg_rating"] = ((sum_ratings + F.RATING_PRIOR_WEIGHT * F.DEFAULT_RATING)
                              / (n_ratings + F.RATING_PRIOR_WEIGHT))
    last = pd.Series(ts).groupby(keys).max()
    out["user_last_event_ts"] = last.reindex(rows).fillna(0).to_numpy()
    profile = catalog.users.iloc[rows]
    out["user_signup_ts"] = pd.to_numeric(profile[S.SIGNUP_TS], errors="coerce").fillna(0)
    out["user_age_bucket"] = profile[S.AGE_BUCKET].to_numpy(object)
    out["user_gender"] = profile[S.GENDER].to_numpy(object)
    # share of the user's positives per genre (GENRE_VOCAB order)
    positive = hist[pos > 0]
    pos_matrix = sp.csr_matrix(
        (np.ones(len(positive), np.float32), (positive["user_idx"], positive["item_idx"])),
        shape=(len(catalog.user_ids), len(catalog.item_ids)))
    genre_counts = np.asarray(pos_matrix[rows] @ F.genre_multi_hot(catalog.items[S.GENRES]))
    share = genre_counts / np.maximum(genre_counts.sum(axis=1, keepdims=True), 1.0)
    out["user_genre_affinity"] = list(share.astype(np.float32))
    return pd.DataFrame({k: (list(v) if k == "user_genre_affinity" else np.asarray(v))
                         for k, v in out.items()})


def item_rows_at(events: IE.ItemEvents, catalog: Catalog, items: np.ndarray,
                 now_ms: np.ndarray) -> dict[str, Any]:
    """Raw item feature columns (``features.ITEM_FIELDS``), one row per (item, now) query.

    Returned as a column mapping (genres as a pyarrow list array, no per-row Python objects).

    Popularity windows, rating mean and last-event time are point-in-time: only history events
    (``events``, every user's) strictly before the query's ``now_ms`` count.
    """
    keys, ts, etype = events.item, events.ts, events.event_type
    engaged = (etype != IE.IMPRESSION).astype(np.float64)
    is_rating = (etype == IE.RATING).astype(np.float64)
    value = events.rating
    out = {f"item_pop_{w}": _window_counts(keys, ts, engaged, items, now_ms, ms)
           for w, ms in WINDOWS_MS.items()}
    out["item_pop_total"] = _window_counts(keys, ts, engaged, items, now_ms, None)
    week = WINDOWS_MS["7d"]
    imps = _window_counts(keys, ts, (etype == IE.IMPRESSION).astype(float), items, now_ms, week)
    clicks = _window_counts(keys, ts, (etype == IE.CLICK).astype(float), items, now_ms, week)
    out["item_impressions_7d"], out["item_clicks_7d"] = imps, clicks
    out["item_ctr"] = (clicks + F.CTR_PRIOR_A) / (imps + F.CTR_PRIOR_A + F.CTR_PRIOR_B)
    n_ratings = _window_counts(keys, ts, is_rating, items, now_ms, None)
    sums = _window_counts(keys, ts, value, items, now_ms, None)
    out["item_ratings_total"] = n_ratings
    out["item_avg_rating"] = ((sums + F.RATING_PRIOR_WEIGHT * F.DEFAULT_RATING)
                              / (n_ratings + F.RATING_PRIOR_WEIGHT))
    comp = keys.astype(np.int64) * (1 << 42) + ts
    before = np.searchsorted(comp, items.astype(np.int64) * (1 << 42) + now_ms, side="left") - 1
    has = (before >= 0) & (keys[np.maximum(before, 0)] == items) if len(keys) else before >= 0
    out["item_last_event_ts"] = np.where(has, ts[np.maximum(before, 0)] if len(ts) else 0, 0)
    content = catalog.items.iloc[items]
    out["item_genres"] = catalog.genre_lists().take(pa.array(items))
    out["item_release_year"] = pd.to_numeric(content[S.RELEASE_YEAR], errors="coerce").fillna(0)
    out["item_duration_s"] = pd.to_numeric(content[S.DURATION_S], errors="coerce").fillna(0)
    out["item_created_at"] = pd.to_numeric(content[S.CREATED_AT], errors="coerce").fillna(0)
    return {k: v if k == "item_genres" else np.asarray(v, dtype=np.float64)
            for k, v in out.items()}


def session_rows(history: pd.DataFrame, catalog: Catalog, rows: np.ndarray,
                 n_recent: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Raw ``user_session`` rows (the user's last session in the history) and recent items.

    Returns
    -------
    raw : DataFrame of ``features.SESSION_FIELDS`` for ``rows``; ``recent_item_ids`` is the
        query history (``tandem.features.query_history``: across sessions, as the session state
        keeps it)
    recent : int [len(rows), n_recent] the first ``n_recent`` of it (the ranker's recency
        features, as serving's), PAD-filled
    """
    hist = _indexed(history, catalog)
    hist = hist[hist["user_idx"].isin(rows) & (hist[S.EVENT_TYPE] != S.IMPRESSION)]
    tie = pd.util.hash_pandas_object(hist[S.EVENT_ID], index=False).to_numpy()
    hist = hist.iloc[np.lexsort((tie, hist[S.TS].to_numpy(), hist["user_idx"].to_numpy()))]
    u, ts = hist["user_idx"].to_numpy(), hist[S.TS].to_numpy(np.int64)
    # [:len(u)]: an empty history (no request user has a non-impression event) has no sessions
    new_session = np.r_[True, (u[1:] != u[:-1]) | (np.diff(ts) >= S.SESSION_GAP_MS)][:len(u)]
    session_no = np.cumsum(new_session)
    last_session = pd.Series(session_no).groupby(u).transform("max").to_numpy()
    sess = hist[session_no == last_session]
    # newest first within each user
    rev = sess.iloc[::-1]
    genre_of = pd.Series(catalog.items[S.GENRES].to_numpy(), index=catalog.item_ids)
    genres = rev[["user_idx", S.ITEM_ID]].assign(g=rev[S.ITEM_ID].map(genre_of)).explode("g")
    genres = genres.dropna().drop_duplicates(["user_idx", "g"])
    genres_by_user = genres.groupby("user_idx")["g"].agg(lambda g: list(g)[:5])
    agg = sess.groupby("user_idx").agg(start=(S.TS, "min"), last=(S.TS, "max"),
                                       length=(S.TS, "size"))
    counts = pd.crosstab(sess["user_idx"], sess[S.EVENT_TYPE])
    raw = pd.DataFrame({
        S.SESSION_RECENT_ITEMS: None,
        S.SESSION_RECENT_GENRES: genres_by_user.reindex(rows).tolist(),
        S.SESSION_LENGTH: agg["length"].reindex(rows).fillna(0).to_numpy(),
        S.SESSION_START_TS: agg["start"].reindex(rows).fillna(0).to_numpy(),
        S.SESSION_LAST_TS: agg["last"].reindex(rows).fillna(0).to_numpy(),
    })
    for t in S.EVENT_TYPES:
        col = counts[t] if t in counts.columns else pd.Series(dtype=float)
        raw[S.SESSION_COUNT_PREFIX + t] = col.reindex(rows).fillna(0).to_numpy()
    raw[S.SESSION_RECENT_GENRES] = [v if isinstance(v, list) else None
                                    for v in raw[S.SESSION_RECENT_GENRES]]
    engaged = QH.is_engagement(hist[S.EVENT_TYPE].to_numpy())
    query = QH.query_items(pd.Index(rows).get_indexer(hist["user_idx"])[engaged],
                           hist["item_idx"].to_numpy()[engaged], ts[engaged], len(rows),
                           max(n_recent, QH.QUERY_LEN))
    raw[S.SESSION_RECENT_ITEMS] = [list(catalog.item_ids[q[q >= 0][:QH.QUERY_LEN]]) or None
                                   for q in query]
    return raw, query[:, :n_recent].astype(np.int64)
