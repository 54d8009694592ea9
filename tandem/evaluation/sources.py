"""The retrieval sources of the offline protocol, fitted once on a history: ALS, two-tower,
sequence model, genre-profile content and popularity, each answering top lists per user with the
user's seen items excluded, and the merged candidate pool of the two-stage system.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tandem import schema as S
from tandem.data import item_events as IE
from tandem.data.dataset import positives
from tandem.evaluation.protocol import EVAL_CONFIG, Catalog, Progress, _indexed, _quiet
from tandem.features import entity as F
from tandem.features import query_history as QH
from tandem.features import ranking_features as RF
from tandem.models import als as A
from tandem.policy import retrieval as T


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
    pairs = (engaged_pairs(hist, cfg["play_dwell_ms"]) if cfg.get("two_tower") is not None
             or cfg.get("sequence") is not None else None)
    if cfg.get("two_tower") is not None:
        progress("fitting two-tower")
        t0 = time.perf_counter()
        tower = _fit_tower(hist, catalog, cfg, pairs)
        timings["two_tower_fit_s"] = time.perf_counter() - t0
    sequence = recent = None
    if cfg.get("sequence") is not None:
        progress("fitting the sequence model")
        t0 = time.perf_counter()
        sequence, recent = _fit_sequence(hist, catalog, cfg, pairs)
        timings["sequence_fit_s"] = time.perf_counter() - t0
    space = RF.ItemSpace(RF.unit_rows(als.item_factors), RF.cooccurrence(seen))
    return Fitted(history, seen, popularity, als, tower, space, timings, sequence, recent,
                  catalog if cfg.get("content_k") else None,
                  IE.ItemEvents.of(history, catalog.item_ids))


def content_inputs(history: pd.DataFrame, catalog: Catalog, popularity: np.ndarray,
                   rows: np.ndarray, play_dwell_ms: int | None) -> tuple:
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
    return (T.GenreLists.build(item_genres, np.asarray(popularity, np.float32)), item_genres,
            affinity, recent)


def session_intents(fitted: Fitted, catalog: Catalog, rows: np.ndarray,
                    play_dwell_ms: int | None) -> np.ndarray:
    """float32 [len(rows), n_genres]: the genres each user's newest engaged items agree on at
    the end of the history (``tandem.policy.retrieval.session_intent`` of the query history of
    :func:`content_inputs`), the target serving's re-ranking calibrates a shown list to
    (``serving.session_retrieval.SessionRetrieval.intent``). One call per user, never per
    candidate."""
    _, item_genres, _, recent = content_inputs(fitted.history, catalog, fitted.popularity, rows,
                                               play_dwell_ms)
    return np.stack([T.session_intent(item_genres, recent[i])
                     for i in range(len(rows))]) if len(rows) else np.zeros((0, F.N_GENRES),
                                                                            np.float32)


def content_lists(inputs: tuple, seen: sp.csr_matrix, k: int) -> pd.DataFrame:
    """(local, item, score, rank) of the content source for each row of ``seen`` (the users of
    :func:`content_inputs`, in its order): the lists serving draws from
    (``tandem.policy.retrieval.GenreLists``) on the same genre profile, seen items dropped.
    One call per user (microseconds each), never per candidate."""
    genre_lists, item_genres, affinity, recent = inputs
    frames = []
    for row in range(seen.shape[0]):
        profile = T.content_profile(affinity[row], item_genres, recent[row])
        done = seen.indices[seen.indptr[row]:seen.indptr[row + 1]]
        items, scores = genre_lists.candidates(profile, k + len(done))
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


def _fit_sequence(hist: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any],
                  pairs: pd.DataFrame):
    """The sequence model on the history's engaged ``pairs`` (:func:`engaged_pairs`) in time
    order, the positive ones its targets (as ``jobs/train_sequence.py`` on the table): (numpy
    runtime, each user's query history, newest first)."""
    from tandem.models.sequence_train import SequenceConfig, train_sequence

    seq_cfg = SequenceConfig(**cfg["sequence"])
    model = train_sequence(pairs["user_idx"].to_numpy(np.int64),
                           pairs["item_idx"].to_numpy(np.int64), pairs["ts"].to_numpy(np.int64),
                           len(catalog.item_ids), seq_cfg, pairs["positive"].to_numpy(bool))
    recent = _query_rows(hist, len(catalog.user_ids), min(QH.QUERY_LEN, seq_cfg.max_len))
    return model.encoder(), recent


def _fit_tower(hist: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any], pairs: pd.DataFrame):
    """Two-tower on the history's positive interactions (``tandem.models.two_tower``), its engaged
    ``pairs`` (:func:`engaged_pairs`) the query histories (as ``jobs/train_two_tower.py`` on the
    table)."""
    from tandem.features.tower_features import ItemContentSpec
    from tandem.models.two_tower import TwoTowerConfig, train_two_tower

    spec = ItemContentSpec.fit(catalog.items[S.GENRES].tolist())
    content = spec.encode(catalog.items[S.GENRES].tolist(),
                          catalog.items[S.RELEASE_YEAR].tolist())
    train = hist.loc[positives(hist, cfg["play_dwell_ms"]), ["user_idx", "item_idx", S.TS]]
    tt_cfg = TwoTowerConfig(**cfg["two_tower"])
    return train_two_tower(train, content, cfg=tt_cfg, n_users=len(catalog.user_ids),
                           item_spec=spec, history=pairs[["user_idx", "item_idx", "ts"]])


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
        top = content_lists(inputs, fitted.seen[user_rows], cfg["content_k"])
        top.insert(0, "user_row", user_rows[top.pop("local").to_numpy(np.int64)])
        frames.append(top.rename(columns={"score": "content_score", "rank": "content_rank"})
                      .set_index(["user_row", "item"]))
    union = pd.concat(frames, axis=1).sort_index().reset_index()
    return union
