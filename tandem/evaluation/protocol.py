"""The offline evaluation protocol: temporal holdout, retrieval sources, two-stage ranking.

Protocol (issue 4):

- **split**: per user, events sorted by time form a sequence; the last ``floor(0.2 * n)`` are the
  test set, the rest training. Ties in time are broken by a fixed hash of ``event_id`` (MovieLens
  users rate many films in the same second; sorting ties by item id would put high ids, i.e.
  newer and rarer films, into the test set and bias every model).
- **relevant**: :func:`tandem.data.dataset.positives` (rating >= 4 for explicit data, any positive
  engagement otherwise); items seen in training are never recommended; metrics average over users
  with at least one relevant test item.
- **models**, all fit on the same training data: popularity, ALS alone, two-tower alone, the
  session sequence model alone (``tandem.models.sequence``: next items after the user's query
  history, ``tandem.features.query_history``, the items serving asks every model with), and the
  two-stage system (union of ALS top-``als_k``, two-tower top-``two_tower_k``, sequence
  top-``sequence_k``, content top-``content_k`` and popular fill, re-ranked by LightGBM).
- **ranker labels** come from INNER temporal splits of the training data (same rule), nested
  ``ranker_splits`` deep (each splits the previous one's training part): sources are fit on the
  inner training part, their candidates for each user are labelled with that user's
  inner-holdout positives, the inner holdout's explicit negatives (rated below the positive
  threshold, shown but not engaged: what ``lake/labels/ranking`` holds as label 0) are all
  kept, and the ranker learns on every split's requests. The sources are then refit on the full
  training data for the test pass (quality probe in ``../shared/notes``).
- **re-ranking**: the two-stage lists are shown through serving's MMR / genre cap
  (``tandem.policy.diversify``); the ranked lists are computed once and re-ranked with every
  (``mmr_lambda``, ``genre_cap``) of ``diversify_grid``, and the setting is chosen on the first
  inner split's held-out users (``tandem.evaluation.diversify_sweep``), never on the test split.
- **tuning** (``cfg["tune"]``: a ``tandem.config.TuningSettings``; absent by default): Optuna
  studies (``tandem.evaluation.tuning``) choose ALS's, the two-tower's and the ranker's parameters
  by NDCG@10 on the inner split -- the test period is never seen -- and every later fit uses the
  choice.

Entity features are computed point-in-time at each user's request time (the time of the user's
first held-out event) with the :mod:`tandem.features.entity` transforms, from raw rows that
:func:`user_rows` / :func:`item_rows_at` / :func:`session_rows` derive from the history (the
item rows from :class:`tandem.data.item_events.ItemEvents`, every history event in four numpy
columns, which the nightly jobs stream from the lake instead of loading the window); the
feature store's historical path serves the same raw fields to ``jobs/train_ranker.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from tandem import schema as S
from tandem.config import TuningSettings
from tandem.data import item_events as IE
from tandem.data.dataset import Dataset, positives
from tandem.evaluation import diversify_sweep as DS
from tandem.evaluation import metrics as M
from tandem.evaluation import tuning
from tandem.features import entity as F
from tandem.features import query_history as QH
from tandem.features import ranking_features as RF
from tandem.models import als as A
from tandem.models import ranker as R
from tandem.policy import diversify as D
from tandem.policy import retrieval as T

EVAL_CONFIG: dict[str, Any] = {
    "test_fraction": 0.2,
    "k": 10,
    "retrieval_k": 500,  # recall@retrieval_k per source
    "als_k": 200,
    "two_tower_k": 500,
    "popular_k": 50,
    "play_dwell_ms": 30_000,  # a play this long counts as positive (non-explicit data)
    "als": A.ALS_CONFIG,
    "ranker": R.RANKER_CONFIG,
    "ranker_negative_rate": 0.3,  # share of negative candidates kept for ranker training
    "ranker_splits": 2,  # nested inner temporal splits the ranker's requests come from
    # TwoTowerConfig overrides; None disables the source. One thread: deterministic, and
    # OpenMP spinning made 2 threads ~10x slower on a busy 2-core machine.
    "two_tower": {"num_threads": 1},
    "sequence": {"num_threads": 1},  # SequenceConfig overrides; None disables the source
    "sequence_k": 200,
    "content_k": 100,  # genre-profile candidates, as serving's ``n_content``; 0 disables
    "diversify": D.DIVERSIFY_CONFIG,  # serving's MMR / genre-cap defaults, applied to two-stage
    # (mmr_lambda, genre_cap) grid re-ranking the two-stage lists; the setting is chosen on the
    # inner validation split (tandem.evaluation.diversify_sweep) and replaces "diversify"'s; None:
    # no sweep
    "diversify_grid": DS.GRID,
    "sweep_user_share": 0.25,  # first inner split's users held out of the validation ranker
}
MODELS = ("popularity", "als", "two_tower", "sequence", "two_stage")
WINDOWS_MS = {"1h": 3_600_000, "24h": 86_400_000, "7d": 7 * 86_400_000}
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """Default progress callback: say nothing."""


# ------------------------------------------------------------------------------------ the split

def temporal_split(events: pd.DataFrame, test_fraction: float = 0.2
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test): each user's last ``floor(test_fraction * n)`` events by time are test.

    Ties in ``ts`` are ordered by a fixed (seedless, platform-independent) hash of ``event_id``.
    Both frames keep the input columns and are sorted by (user, ts).
    """
    tie = pd.util.hash_pandas_object(events[S.EVENT_ID], index=False).to_numpy()
    order = np.lexsort((tie, events[S.TS].to_numpy(), events[S.USER_ID].to_numpy()))
    ordered = events.iloc[order].reset_index(drop=True)
    users = ordered[S.USER_ID]
    pos = ordered.groupby(users, sort=False).cumcount().to_numpy()
    n = users.map(users.value_counts()).to_numpy()
    n_test = np.floor(test_fraction * n + 1e-9).astype(np.int64)
    is_test = pos >= n - n_test
    return ordered[~is_test].reset_index(drop=True), ordered[is_test].reset_index(drop=True)


def relevant_pairs(test: pd.DataFrame, play_dwell_ms: int | None) -> pd.DataFrame:
    """Distinct (user_id, item_id) of the positive test events."""
    rel = test.loc[positives(test, play_dwell_ms), [S.USER_ID, S.ITEM_ID]]
    return rel.drop_duplicates().reset_index(drop=True)


# --------------------------------------------------------------------------- index and sources

@dataclass
class Catalog:
    """Dense indices: items in catalog order, users in id order; genres aligned to items."""

    user_ids: pd.Index
    item_ids: pd.Index
    items: pd.DataFrame  # catalog rows, item_ids order
    users: pd.DataFrame  # profile rows, user_ids order (missing users get null rows)

    def genre_lists(self) -> pa.ListArray:
        """Each catalog item's genres as a pyarrow list array (null where unknown)."""
        return pa.array([list(g) if isinstance(g, (list, tuple, np.ndarray)) else None
                         for g in self.items[S.GENRES]], type=pa.list_(pa.string()))

    @classmethod
    def of(cls, data: Dataset) -> Catalog:
        item_ids = pd.Index(data.items[S.ITEM_ID].astype(str))
        extra = pd.Index(pd.unique(data.events[S.ITEM_ID])).difference(item_ids)
        items = pd.concat([data.items, pd.DataFrame({S.ITEM_ID: extra})], ignore_index=True)
        ids = pd.Index(pd.unique(pd.concat([data.events[S.USER_ID], data.users[S.USER_ID]])))
        user_ids = pd.Index(sorted(ids, key=lambda u: (len(u), u)))
        users = data.users.set_index(S.USER_ID).reindex(user_ids).reset_index()
        return cls(user_ids, item_ids.append(extra), items.reset_index(drop=True), users)


@dataclass
class Fitted:
    """The retrieval sources fit on one history, plus what ranking features need from it.

    Attributes
    ----------
    seen : float32 CSR [n_users, n_items], 1 where the user interacted in the history
    popularity : float64 [n_items], distinct users per item in the history
    als : ALS factors over the catalog's user/item order
    tower : two-tower model (or None when disabled/unavailable)
    space : ALS unit vectors and co-occurrence for the recency features
    sequence : the sequence model's numpy runtime (``tandem.models.sequence.SequenceEncoder``) or
    None
    sequence_recent : int [n_users, L] each user's query history at the end of the history
        (``tandem.features.query_history``, at most its ``max_len``), newest first: the model's
        query
    catalog : the catalog the content source reads genres from (None: no content source)
    item_events : every history event as the item features count it (None: the item features
        come from the feature store)
    """

    history: pd.DataFrame
    seen: sp.csr_matrix
    popularity: np.ndarray
    als: A.AlsFactors
    tower: Any
    space: RF.ItemSpace
    timings: dict[str, float] = field(default_factory=dict)
    sequence: Any = None
    sequence_recent: np.ndarray | None = None
    catalog: Catalog | None = None
    item_events: IE.ItemEvents | None = None


def _indexed(events: pd.DataFrame, catalog: Catalog) -> pd.DataFrame:
    """Events with int ``user_idx``/``item_idx`` columns added."""
    return events.assign(user_idx=catalog.user_ids.get_indexer(events[S.USER_ID]),
                         item_idx=catalog.item_ids.get_indexer(events[S.ITEM_ID]))


def fit_sources(history: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any] = EVAL_CONFIG,
                progress: Progress = _quiet) -> Fitted:
    """Fit popularity, ALS and (when configured) the two-tower model on ``history``."""
    timings = {}
    hist = _indexed(history, catalog)
    shape = (len(catalog.user_ids), len(catalog.item_ids))
    seen = sp.csr_matrix((np.ones(len(hist), np.float32), (hist["user_idx"], hist["item_idx"])),
                         shape=shape)
    seen.data[:] = 1.0
    popularity = np.asarray(seen.sum(axis=0), dtype=np.float64).ravel()
    progress("fitting ALS")
    t0 = time.perf_counter()
    pairs = A.pair_confidence(history, cfg["als"])
    matrix = A.confidence_matrix(pairs, catalog.user_ids, catalog.item_ids)
    als = A.fit_als(matrix, catalog.user_ids, catalog.item_ids, cfg["als"])
    timings["als_fit_s"] = time.perf_counter() - t0
    tower = None
    if cfg.get("two_tower") is not None:
        progress("fitting two-tower")
        t0 = time.perf_counter()
        tower = _fit_tower(hist, catalog, cfg)
        timings["two_tower_fit_s"] = time.perf_counter() - t0
    sequence = recent = None
    if cfg.get("sequence") is not None:
        progress("fitting the sequence model")
        t0 = time.perf_counter()
        sequence, recent = _fit_sequence(hist, catalog, cfg)
        timings["sequence_fit_s"] = time.perf_counter() - t0
    space = RF.ItemSpace(RF.unit_rows(als.item_factors), RF.cooccurrence(seen))
    return Fitted(history, seen, popularity, als, tower, space, timings, sequence, recent,
                  catalog if cfg.get("content_k") else None,
                  IE.ItemEvents.of(history, catalog.item_ids))


def content_inputs(history: pd.DataFrame, catalog: Catalog, popularity: np.ndarray,
                   rows: np.ndarray, play_dwell_ms: int | None) -> tuple[np.ndarray, ...]:
    """What serving's content source reads, from ``history`` for user ``rows``: each genre's
    popular items, the catalog's genre multi-hot, each user's ``user_genre_affinity`` (share of
    positives per genre, as :func:`user_rows`) and query history (``tandem.features.query_history``,
    as serving reads it from the session row), the last two aligned with ``rows``."""
    hist = _indexed(history, catalog)
    hist = hist[hist["user_idx"].isin(rows)]
    local = pd.Index(rows).get_indexer(hist["user_idx"])
    item_genres = F.genre_multi_hot(catalog.items[S.GENRES]) > 0
    pos = positives(hist, play_dwell_ms)
    counts = sp.csr_matrix((np.ones(int(pos.sum()), np.float32),
                            (local[pos], hist["item_idx"].to_numpy()[pos])),
                           shape=(len(rows), len(catalog.item_ids))) @ item_genres
    affinity = np.asarray(counts, np.float32)
    affinity /= np.maximum(affinity.sum(axis=1, keepdims=True), 1.0)
    engaged = QH.is_engagement(hist[S.EVENT_TYPE].to_numpy())
    recent = QH.query_items(local[engaged], hist["item_idx"].to_numpy()[engaged],
                            hist[S.TS].to_numpy(np.int64)[engaged], len(rows),
                            T.N_RECENT_GENRE_ITEMS)
    return T.genre_top_rows(item_genres, popularity), item_genres, affinity, recent


def content_lists(inputs: tuple[np.ndarray, ...], popularity: np.ndarray, seen: sp.csr_matrix,
                  k: int) -> pd.DataFrame:
    """(local, item, score, rank) of the content source for each row of ``seen`` (the users of
    :func:`content_inputs`, in its order): the function serving calls
    (``tandem.policy.retrieval.content_candidates``) on the same genre profile, seen items dropped.
    One call per user (microseconds each), never per candidate."""
    genre_top, item_genres, affinity, recent = inputs
    frames = []
    for row in range(seen.shape[0]):
        profile = T.content_profile(affinity[row], item_genres, recent[row])
        done = seen.indices[seen.indptr[row]:seen.indptr[row + 1]]
        items, scores = T.content_candidates(genre_top, item_genres, popularity, profile,
                                             k + len(done))
        keep = ~np.isin(items, done)
        items, scores = items[keep][:k], scores[keep][:k]
        frames.append(pd.DataFrame({"local": row, "item": items, "score": scores,
                                    "rank": np.arange(1, len(items) + 1, dtype=np.float32)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {"local": [], "item": [], "score": [], "rank": []})


def engaged_pairs(hist: pd.DataFrame, play_dwell_ms: int | None) -> pd.DataFrame:
    """(user_idx, item_idx, ts, positive) of the indexed history's engaged pairs, ``ts`` = the
    first engagement and ``positive`` = any positive event: the training table's ``engaged_ts``
    and ``positive_ts`` rows, the query histories' input (``tandem.features.query_history``)."""
    engaged = hist.assign(positive=positives(hist, play_dwell_ms))[
        QH.is_engagement(hist[S.EVENT_TYPE].to_numpy())]
    return (engaged.groupby(["user_idx", "item_idx"], sort=False)
            .agg(ts=(S.TS, "min"), positive=("positive", "any")).reset_index())


def _query_rows(hist: pd.DataFrame, n_users: int, n: int) -> np.ndarray:
    """int32 [n_users, n]: every user's query history at the end of the indexed ``hist``."""
    engaged = QH.is_engagement(hist[S.EVENT_TYPE].to_numpy())
    return QH.query_items(hist["user_idx"].to_numpy()[engaged],
                          hist["item_idx"].to_numpy()[engaged],
                          hist[S.TS].to_numpy(np.int64)[engaged], n_users, n)


def _fit_sequence(hist: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any]):
    """The sequence model on the history's engaged pairs in time order, the positive ones its
    targets (as ``jobs/train_sequence.py`` on the table): (numpy runtime, each user's query
    history, newest first)."""
    from tandem.models.sequence_train import SequenceConfig, train_sequence

    pairs = engaged_pairs(hist, cfg["play_dwell_ms"])
    seq_cfg = SequenceConfig(**cfg["sequence"])
    model = train_sequence(pairs["user_idx"].to_numpy(np.int64),
                           pairs["item_idx"].to_numpy(np.int64), pairs["ts"].to_numpy(np.int64),
                           len(catalog.item_ids), seq_cfg, pairs["positive"].to_numpy(bool))
    recent = _query_rows(hist, len(catalog.user_ids), min(QH.QUERY_LEN, seq_cfg.max_len))
    return model.encoder(), recent


def _fit_tower(hist: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any]):
    """Two-tower on the history's positive interactions (``tandem.models.two_tower``), its engaged
    pairs the query histories (as ``jobs/train_two_tower.py`` on the table)."""
    from tandem.features.tower_features import ItemContentSpec
    from tandem.models.two_tower import TwoTowerConfig, train_two_tower

    spec = ItemContentSpec.fit(catalog.items[S.GENRES].tolist())
    content = spec.encode(catalog.items[S.GENRES].tolist(),
                          catalog.items[S.RELEASE_YEAR].tolist())
    train = hist.loc[positives(hist, cfg["play_dwell_ms"]), ["user_idx", "item_idx", S.TS]]
    tt_cfg = TwoTowerConfig(**cfg["two_tower"])
    history = engaged_pairs(hist, cfg["play_dwell_ms"])[["user_idx", "item_idx", "ts"]]
    return train_two_tower(train, content, cfg=tt_cfg, n_users=len(catalog.user_ids),
                           item_spec=spec, history=history)


def source_scores(fitted: Fitted, user_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Exact scores [len(user_rows), n_items] per source (float32)."""
    n_items = fitted.seen.shape[1]
    out = {"popularity": np.broadcast_to(fitted.popularity.astype(np.float32),
                                         (len(user_rows), n_items)),
           "als": fitted.als.scores(user_rows)}
    if fitted.tower is not None:
        out["two_tower"] = (fitted.tower.user_vectors()[user_rows]
                            @ fitted.tower.item_vectors().T).astype(np.float32)
    if fitted.sequence is not None:
        queries = fitted.sequence.encode_batch(fitted.sequence_recent[user_rows])
        out["sequence"] = (queries @ fitted.sequence.item_vectors.T).astype(np.float32)
    return out


def top_lists(scores: np.ndarray, k: int, seen: sp.csr_matrix, user_rows: np.ndarray
              ) -> pd.DataFrame:
    """(user_row, item, score, rank) of each user's top-``k`` unseen items."""
    idx, val = A.top_k_items(scores, k, exclude=seen[user_rows])
    kk = idx.shape[1]
    frame = pd.DataFrame({"user_row": np.repeat(user_rows, kk), "item": idx.ravel(),
                          "score": val.ravel(), "rank": np.tile(np.arange(1, kk + 1),
                                                                len(user_rows))})
    return frame[np.isfinite(frame["score"])]


def candidates(fitted: Fitted, user_rows: np.ndarray, cfg: dict[str, Any],
               scores: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Union of the sources' top lists: (user_row, item, <src>_score, <src>_rank), NaN if absent.

    Sorted by (user_row, item) so rows of one user are contiguous (one ranker group).
    """
    scores = scores if scores is not None else source_scores(fitted, user_rows)
    depth = {"als": cfg["als_k"], "two_tower": cfg["two_tower_k"], "popularity": cfg["popular_k"],
             "sequence": cfg.get("sequence_k", 0)}
    frames = []
    for src, s in scores.items():
        top = top_lists(s, depth[src], fitted.seen, user_rows)
        frames.append(top.rename(columns={"score": f"{src}_score", "rank": f"{src}_rank"})
                      .set_index(["user_row", "item"]))
    if fitted.catalog is not None and cfg.get("content_k"):
        inputs = content_inputs(fitted.history, fitted.catalog, fitted.popularity, user_rows,
                                cfg["play_dwell_ms"])
        top = content_lists(inputs, fitted.popularity, fitted.seen[user_rows], cfg["content_k"])
        top.insert(0, "user_row", user_rows[top.pop("local").to_numpy(np.int64)])
        frames.append(top.rename(columns={"score": "content_score", "rank": "content_rank"})
                      .set_index(["user_row", "item"]))
    union = pd.concat(frames, axis=1).sort_index().reset_index()
    return union


# ------------------------------------------------------------------ raw entity rows (in-process)

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


@dataclass
class Requests:
    """Who is ranked and when: one request per user row."""

    user_rows: np.ndarray  # int [m]
    now_ms: np.ndarray  # int64 [m], the request time (the user's first held-out event)
    device: np.ndarray  # object [m], ctx_device of that event
    # int [m, L] the sequence model's query items per request (newest first), when they are
    # not ``Fitted.sequence_recent``'s rows (the nightly path's request-local histories)
    sequence_recent: np.ndarray | None = None


def requests_from(heldout: pd.DataFrame, catalog: Catalog, users: pd.Index) -> Requests:
    """One request per user in ``users``, at the time of their first held-out event."""
    first = heldout.sort_values(S.TS, kind="stable").drop_duplicates(S.USER_ID)
    first = first.set_index(S.USER_ID).reindex(users)
    return Requests(catalog.user_ids.get_indexer(users), first[S.TS].to_numpy(np.int64),
                    first[S.CTX_DEVICE].to_numpy(object))


def feature_matrix(fitted: Fitted, catalog: Catalog, req: Requests, cands: pd.DataFrame,
                   cfg: dict[str, Any]) -> np.ndarray:
    """:func:`ranking_features.build_features` for ``cands`` of the requests' users."""
    local = pd.Index(req.user_rows).get_indexer(cands["user_row"])
    urows = user_rows(fitted.history, catalog, req.user_rows, req.now_ms, cfg["play_dwell_ms"])
    user_mat = F.user_matrix(urows, req.now_ms)
    items = cands["item"].to_numpy()
    if fitted.item_events is None:
        raise ValueError("no item events: these item features come from the feature store")
    irows = item_rows_at(fitted.item_events, catalog, items, req.now_ms[local])
    item_mat = F.item_matrix(irows, req.now_ms[local])
    sess, recent = session_rows(fitted.history, catalog, req.user_rows, RF.N_RECENT)
    session_mat = F.session_matrix(sess, req.now_ms)
    hour = ((req.now_ms // 3_600_000) % 24).astype(np.float32)
    sources = {c: cands[c].to_numpy(np.float32) for c in cands.columns
               if c.endswith(("_score", "_rank"))}
    return RF.build_features(local, items, sources, user_mat, item_mat, session_mat, hour,
                             RF.device_codes(req.device), recent, fitted.space,
                             sequence_inputs(fitted, req))


def sequence_inputs(fitted: Fitted, req: Requests) -> tuple[np.ndarray, np.ndarray] | None:
    """(queries [m, d] of the requests' users, item vectors) for ``sequence_affinity``: the
    query the sequence source retrieves with (:func:`source_scores`); None without the model."""
    if fitted.sequence is None:
        return None
    recent = (req.sequence_recent if req.sequence_recent is not None
              else fitted.sequence_recent[req.user_rows])
    return fitted.sequence.encode_batch(recent), fitted.sequence.item_vectors


# ---------------------------------------------------------------------------------- evaluation

def diversified(fitted: Fitted, catalog: Catalog, cands: pd.DataFrame, ranked: np.ndarray,
                k: int, cfg: dict[str, Any]) -> np.ndarray:
    """Positions into ``cands`` of each user's ``k`` shown items, in the order shown: serving's
    re-ranking (``tandem.policy.diversify.rerank``: MMR over serving's item vectors -- the
    two-tower's, unit ALS factors without it -- and the genre cap) on the ranker's scores. One call
    per user (the request path's own loop), never per candidate."""
    vectors = (fitted.tower.item_vectors() if fitted.tower is not None
               else RF.unit_rows(fitted.als.item_factors))
    genres = F.genre_multi_hot(catalog.items[S.GENRES])
    users = cands["user_row"].to_numpy()
    items = cands["item"].to_numpy()
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1] if len(users) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(users)]
    picked = [lo + D.rerank(ranked[lo:hi], items[lo:hi], vectors, genres, k, cfg)
              for lo, hi in zip(starts, ends, strict=True)]
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def _position_in_group(users: np.ndarray) -> np.ndarray:
    """0-based position of each row within its run of equal ``users`` (the shown order)."""
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1] if len(users) else np.zeros(0, int)
    return (np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)])))\
        .astype(float)


def _pred_frame(catalog: Catalog, user_rows: np.ndarray, items: np.ndarray,
                scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({M.USER: catalog.user_ids[user_rows], M.ITEM: catalog.item_ids[items],
                         M.PREDICTION: scores})


def score_models(pred: pd.DataFrame, rel: pd.DataFrame, train: pd.DataFrame, catalog: Catalog,
                 k: int, primitive: pd.DataFrame | None = None) -> dict[str, float]:
    """Every metric of ``tandem.evaluation.metrics`` at ``k`` for one model's predictions;
    serendipity only with a ``primitive`` model's predictions (the popularity lists) to be
    unexpected from."""
    out = {name.replace("_at_k", f"@{k}"): fn(rel, pred, k=k) for name, fn in M.METRICS.items()}
    vectors = pd.DataFrame(F.genre_multi_hot(catalog.items[S.GENRES]), index=catalog.item_ids)
    out[f"coverage@{k}"] = M.catalog_coverage(pred, len(catalog.item_ids), k)
    out[f"diversity@{k}"] = M.intra_list_diversity(pred, vectors, k)
    out[f"novelty@{k}"] = M.novelty(pred, train, k)
    if primitive is not None:
        out[f"serendipity@{k}"] = M.serendipity(rel, pred, primitive, k)
    return out


def tune_sources(train: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any],
                 settings: TuningSettings, progress: Progress = _quiet
                 ) -> dict[str, tuning.StudyResult]:
    """Optuna studies of ALS and (when configured) the two-tower, scored by NDCG@10 of the
    inner split of ``train`` (the split the ranker's labels come from): the test period is
    never seen. Returns each model's :class:`tandem.evaluation.tuning.StudyResult`."""
    inner_train, inner_val = temporal_split(train, cfg["test_fraction"])
    rel = relevant_pairs(inner_val, cfg["play_dwell_ms"])
    rel = pd.DataFrame({M.USER: catalog.user_ids.get_indexer(rel[S.USER_ID]),
                        M.ITEM: catalog.item_ids.get_indexer(rel[S.ITEM_ID])})
    rows = np.unique(rel[M.USER].to_numpy())
    hist = _indexed(inner_train, catalog)
    seen = sp.csr_matrix((np.ones(len(hist), np.float32), (hist["user_idx"], hist["item_idx"])),
                         shape=(len(catalog.user_ids), len(catalog.item_ids)))
    matrix = A.confidence_matrix(A.pair_confidence(inner_train, cfg["als"]), catalog.user_ids,
                                 catalog.item_ids)

    def als(params: dict[str, Any]) -> float:
        fit = A.fit_als(matrix, catalog.user_ids, catalog.item_ids, {**cfg["als"], **params})
        return tuning.retrieval_ndcg(fit.user_factors[rows], fit.item_factors, seen, rows, rel)

    def two_tower(params: dict[str, Any]) -> float:
        model = _fit_tower(hist, catalog, {**cfg, "two_tower": {**cfg["two_tower"], **params}})
        return tuning.retrieval_ndcg(model.user_vectors()[rows], model.item_vectors(), seen,
                                     rows, rel)

    progress("tuning ALS on the inner split")
    out = {tuning.ALS: tuning.run_study(tuning.ALS, als, settings)}
    if cfg.get("two_tower") is not None:
        progress("tuning the two-tower on the inner split")
        out[tuning.TWO_TOWER] = tuning.run_study(tuning.TWO_TOWER, two_tower, settings)
    return out


def explicit_negatives(heldout: pd.DataFrame, play_dwell_ms: int | None) -> pd.DataFrame:
    """Distinct (user_id, item_id) the held-out events touched without any positive event:
    shown or played but not engaged, or rated below the positive threshold -- the label-0 rows
    ``jobs/build_labels.py`` writes to ``lake/labels/ranking`` (impressions with their outcome,
    ratings otherwise)."""
    pairs = heldout[[S.USER_ID, S.ITEM_ID]].assign(pos=positives(heldout, play_dwell_ms))
    any_pos = pairs.groupby([S.USER_ID, S.ITEM_ID], sort=False)["pos"].any()
    return any_pos[~any_pos].reset_index()[[S.USER_ID, S.ITEM_ID]]


def _pair_mask(cands: pd.DataFrame, pairs: pd.DataFrame, catalog: Catalog) -> np.ndarray:
    """bool [len(cands)]: the candidate's (user, item) is one of ``pairs`` (id columns)."""
    keys = pd.MultiIndex.from_arrays([catalog.user_ids.get_indexer(pairs[S.USER_ID]),
                                      catalog.item_ids.get_indexer(pairs[S.ITEM_ID])])
    return pd.MultiIndex.from_arrays([cands["user_row"], cands["item"]]).isin(keys)


@dataclass
class InnerSplit:
    """One inner temporal split: its sources, requests, every candidate and the ranker's rows.

    ``cands`` holds every candidate of the holdout's users (the validation lists re-rank them);
    ``keep`` marks the rows the ranker learns from, ``X`` / ``labels`` are theirs.
    """

    fitted: Fitted
    req: Requests
    rel: pd.DataFrame
    cands: pd.DataFrame
    keep: np.ndarray
    X: np.ndarray
    labels: np.ndarray


def _ranker_rows(train: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any],
                 progress: Progress) -> tuple[InnerSplit, pd.DataFrame]:
    """One inner temporal split of ``train``: (the split, its inner training part). Sources are
    fit on the inner training part; candidates are labelled with the inner holdout's positives,
    its explicit negatives kept (:func:`R.training_rows`)."""
    inner_train, inner_val = temporal_split(train, cfg["test_fraction"])
    fitted = fit_sources(inner_train, catalog, cfg, progress)
    rel = relevant_pairs(inner_val, cfg["play_dwell_ms"])
    users = pd.Index(pd.unique(rel[S.USER_ID]))
    req = requests_from(inner_val, catalog, users)
    progress("ranker candidates")
    cands = candidates(fitted, req.user_rows, cfg)
    labels = _pair_mask(cands, rel, catalog)
    shown = _pair_mask(cands, explicit_negatives(inner_val, cfg["play_dwell_ms"]), catalog)
    keep = R.training_rows(labels, shown, cands["user_row"].to_numpy(),
                           cfg["ranker_negative_rate"], cfg["ranker"]["random_state"])
    kept = cands[keep].reset_index(drop=True)
    progress("ranker features")
    X = feature_matrix(fitted, catalog, req, kept, cfg)
    return InnerSplit(fitted, req, rel, cands, keep, X, labels[keep]), inner_train


@dataclass
class TwoStage:
    """The ranker and what it learned from: every inner split's rows (``groups``: user row +
    level x n_users), the splits themselves and the ranker's study (or None)."""

    model: Any
    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    splits: list[InnerSplit]
    study: Any = None


def train_two_stage(train: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any],
                    progress: Progress = _quiet, settings: TuningSettings | None = None
                    ) -> TwoStage:
    """Ranker from nested inner temporal splits of ``train``. With ``settings`` the ranker's
    parameters are tuned first on its own rows (a seeded 20 % of the inner splits' users held
    out).

    Split ``j`` holds out the last fraction of split ``j-1``'s training part, so each user
    contributes up to ``ranker_splits`` requests, each at its own time and with only its past
    as features: more labelled requests from the same history, none of them from the test
    period.
    """
    parts, splits, history = [], [], train
    for level in range(cfg["ranker_splits"]):
        split, history = _ranker_rows(history, catalog, cfg, progress)
        groups = split.cands["user_row"].to_numpy()[split.keep] + level * len(catalog.user_ids)
        parts.append((split.X, split.labels, groups))
        splits.append(split)
    X, labels, groups = (np.concatenate(p) for p in zip(*parts, strict=True))
    y = labels.astype(np.int32)
    study = None
    if settings is not None:
        progress("tuning the ranker on the inner split")
        study = tuning.run_study(tuning.RANKER, tuning.ranker_objective(
            X, y, groups, cfg["ranker"], seed=settings.seed), settings)
        cfg = {**cfg, "ranker": {**cfg["ranker"], **study.params}}
    progress("ranker training")
    model = R.train_ranker(X, y, groups, cfg["ranker"])
    return TwoStage(model, X, y, groups, splits, study)


@dataclass
class RankedLists:
    """Users' candidates ranked once, ready to be re-ranked with any diversify setting."""

    fitted: Fitted
    cands: pd.DataFrame
    ranked: np.ndarray
    rel: pd.DataFrame  # (user_id, item_id) relevant pairs
    baseline: pd.DataFrame  # ALS's top-k of the same users (a prediction frame)


def validation_lists(fit: TwoStage, catalog: Catalog, cfg: dict[str, Any]
                     ) -> RankedLists | None:
    """The first inner split's holdout, ranked by a ranker that never saw its users (None when
    the draw holds out no user).

    A seeded ``sweep_user_share`` of that split's users is held out: a second ranker learns on
    every split's rows of the other users only (same parameters), and ranks every candidate of
    the held-out users -- ranked by the final ranker they would be in-sample (it learned from
    them), which flatters relevance against diversity. Baseline: the split's ALS top-k.
    """
    split, k = fit.splits[0], cfg["k"]
    rng = np.random.default_rng(cfg["ranker"]["random_state"])
    held = split.req.user_rows[rng.random(len(split.req.user_rows)) < cfg["sweep_user_share"]]
    if not len(held):
        return None
    learn = ~np.isin(fit.groups % len(catalog.user_ids), held)
    model = R.train_ranker(fit.X[learn], fit.y[learn], fit.groups[learn], cfg["ranker"])
    mine = np.isin(split.req.user_rows, held)
    req = Requests(split.req.user_rows[mine], split.req.now_ms[mine], split.req.device[mine])
    cands = split.cands[np.isin(split.cands["user_row"].to_numpy(), held)].reset_index(
        drop=True)
    ranked = R.predict(model, feature_matrix(split.fitted, catalog, req, cands, cfg))
    held_ids = set(catalog.user_ids[held])
    rel = split.rel[split.rel[S.USER_ID].isin(held_ids)].reset_index(drop=True)
    top = top_lists(split.fitted.als.scores(req.user_rows), k, split.fitted.seen, req.user_rows)
    baseline = _pred_frame(catalog, top["user_row"].to_numpy(), top["item"].to_numpy(),
                           -top["rank"].to_numpy(float))
    return RankedLists(split.fitted, cands, ranked, rel, baseline)


def _shown_frame(lists: RankedLists, catalog: Catalog, k: int, setting: dict[str, Any]
                 ) -> pd.DataFrame:
    """The prediction frame of the lists as shown with one diversify ``setting``."""
    users = lists.cands["user_row"].to_numpy()
    shown = diversified(lists.fitted, catalog, lists.cands, lists.ranked, k, setting)
    return _pred_frame(catalog, users[shown], lists.cands["item"].to_numpy()[shown],
                       -_position_in_group(users[shown]))


def diversify_sweep(valid: RankedLists, test: RankedLists, catalog: Catalog,
                    cfg: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every setting of ``cfg["diversify_grid"]`` on both splits' ranked lists (one re-rank each,
    never a re-ranking of the ranker), and the setting
    :func:`tandem.evaluation.diversify_sweep.choose` picks on the validation rows. Returns (rows
    with ``split``, the choice and its evidence)."""
    k = cfg["k"]
    n_items = len(catalog.item_ids)
    genres = pd.DataFrame(F.genre_multi_hot(catalog.items[S.GENRES]), index=catalog.item_ids)
    rows = []
    for setting in DS.settings(cfg["diversify_grid"], cfg["diversify"]):
        for name, lists in (("validation", valid), ("test", test)):
            rows.append({"split": name, **{key: setting[key] for key in DS.KEYS},
                         **DS.list_metrics(_shown_frame(lists, catalog, k, setting), lists.rel,
                                           n_items, genres, k)})
    baseline = DS.list_metrics(valid.baseline, valid.rel, n_items, genres, k)
    chosen, met = DS.choose([r for r in rows if r["split"] == "validation"], baseline,
                            cfg["diversify"], k)
    return rows, {**chosen, "met_rule": met, "validation_als": baseline,
                  "validation_users": int(valid.cands["user_row"].nunique()),
                  "rule": "best validation NDCG among settings with validation coverage and "
                          "diversity >= ALS's on the same users; else the default"}


def evaluate(data: Dataset, cfg: dict[str, Any] = EVAL_CONFIG,
             progress: Progress = _quiet) -> dict[str, Any]:
    """Run the whole protocol on one dataset; returns the report dict (see jobs/evaluate.py)."""
    t_start = time.perf_counter()
    k = cfg["k"]
    catalog = Catalog.of(data)
    progress("temporal split")
    train, test = temporal_split(data.events, cfg["test_fraction"])
    rel = relevant_pairs(test, cfg["play_dwell_ms"])
    users = pd.Index(pd.unique(rel[S.USER_ID]))
    rows = catalog.user_ids.get_indexer(users)

    t0 = time.perf_counter()
    settings = cfg.get("tune")
    studies = tune_sources(train, catalog, cfg, settings, progress) if settings else {}
    cfg = {**cfg, **{m: {**cfg[m], **r.params} for m, r in studies.items()}}
    t_tune = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit = train_two_stage(train, catalog, cfg, progress, settings)
    if fit.study is not None:
        studies[tuning.RANKER] = fit.study
        cfg = {**cfg, "ranker": {**cfg["ranker"], **fit.study.params}}
    t_ranker = time.perf_counter() - t0
    valid = None
    if cfg.get("diversify_grid"):
        progress("diversify sweep: the validation split's lists")
        t0 = time.perf_counter()
        valid = validation_lists(fit, catalog, cfg)
        t_valid = time.perf_counter() - t0
    progress("refitting sources on the full training data")
    fitted = fit_sources(train, catalog, cfg, progress)
    scores = source_scores(fitted, rows)

    preds, retrieval = {}, {}
    for src, s in scores.items():
        top = top_lists(s, cfg["retrieval_k"], fitted.seen, rows)
        retrieval[src] = M.recall_at_k(rel, _pred_frame(catalog, top["user_row"].to_numpy(),
                                                        top["item"].to_numpy(), -top["rank"]),
                                       k=cfg["retrieval_k"])
        head = top[top["rank"] <= k]
        preds[src] = _pred_frame(catalog, head["user_row"].to_numpy(), head["item"].to_numpy(),
                                 -head["rank"].to_numpy(float))
    progress("two-stage: candidates, features, ranking")
    t0 = time.perf_counter()
    req = requests_from(test, catalog, users)
    cands = candidates(fitted, rows, cfg, scores)
    X = feature_matrix(fitted, catalog, req, cands, cfg)
    ranked = R.predict(fit.model, X)
    t_rank = time.perf_counter() - t0
    union = _pred_frame(catalog, cands["user_row"].to_numpy(), cands["item"].to_numpy(),
                        np.zeros(len(cands)))
    retrieval["combined"] = M.recall_at_k(rel, union, k=len(catalog.item_ids))
    test_lists = RankedLists(fitted, cands, ranked, rel, preds["als"])
    sweep = chosen = None
    if valid is not None:
        progress("diversify sweep: re-ranking with every setting")
        t0 = time.perf_counter()
        sweep, chosen = diversify_sweep(valid, test_lists, catalog, cfg)
        cfg = {**cfg, "diversify": {**cfg["diversify"],
                                    **{key: chosen[key] for key in DS.KEYS}}}
        timings_sweep = {"diversify_validation_lists": t_valid,
                         "diversify_sweep": time.perf_counter() - t0}
    preds["two_stage"] = _shown_frame(test_lists, catalog, k, cfg["diversify"])

    progress("metrics")
    models = {name: score_models(preds[name], rel, train, catalog, k, preds.get("popularity"))
              for name in MODELS if name in preds}
    if "two_tower" not in preds:
        models["two_tower"] = {"missing": "two-tower source disabled or unavailable"}
    if "sequence" not in preds:
        models["sequence"] = {"missing": "sequence source disabled or unavailable"}
    return {
        "dataset": data.name,
        "protocol": {
            "split": f"per-user temporal holdout, last {cfg['test_fraction']:.0%} of each "
                     "user's events by time (ties by event_id hash) are test",
            "relevant": "rating >= 4 for explicit data, any positive engagement otherwise",
            "filter": "items seen in training are excluded",
            "users": "averaged over users with >= 1 relevant test item",
            "k": k, "n_users": int(len(users)), "n_test_relevant": int(len(rel)),
            "n_train_events": int(len(train)), "n_test_events": int(len(test)),
            "ranker": "LightGBM lambdarank on retrieval candidates, labels from "
                      f"{cfg['ranker_splits']} nested inner temporal splits of training data "
                      "(explicit negatives kept); sources refit on full training data",
            "diversify": "serving's re-ranking (tandem.policy.diversify.rerank) of the ranked "
                         "lists; with a sweep, its (mmr_lambda, genre_cap) is chosen on the first "
                         "inner split's held-out users (tandem.evaluation.diversify_sweep), "
                         "never on test",
        },
        "models": models,
        "retrieval": {f"recall@{cfg['retrieval_k']}": {k_: v for k_, v in retrieval.items()
                                                        if k_ != "combined"},
                      "recall_combined": retrieval["combined"],
                      "candidates_per_user": float(len(cands) / max(len(users), 1))},
        "tuning": {m: {"params": r.params, "val_ndcg@10": r.value,
                       "default_val_ndcg@10": r.default_value, "trials": r.trials}
                   for m, r in studies.items()},
        "diversify": {key: cfg["diversify"][key] for key in ("mmr_lambda", "mmr_pool",
                                                              "genre_cap")},
        "diversify_sweep": sweep,
        "diversify_chosen": chosen,
        "timings_s": {"tuning": t_tune, "ranker_train_total": t_ranker, **fitted.timings,
                      "two_stage_test_pass": t_rank, **(timings_sweep if sweep else {}),
                      "total": time.perf_counter() - t_start},
        "ranker": {"rows": len(fit.groups), "groups": int(len(np.unique(fit.groups)))},
    }
