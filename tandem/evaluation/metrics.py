"""Offline ranking metrics over pandas frames (recommenders-style, pure numpy/pandas).

Every accuracy metric shares one signature, as in
``recommenders-team/recommenders: recommenders/evaluation/python_evaluation.py``::

    metric(rating_true, rating_pred, k=10, col_user="user_id", col_item="item_id",
           col_prediction="prediction") -> float

``rating_true`` holds one row per *relevant* (user, item) pair of the test set (the caller decides
relevance, e.g. rating >= 4); ``rating_pred`` holds scored recommendations, of which each user's
``k`` highest ``col_prediction`` rows are the top-k list (ties broken by row order). Scores are
averaged over the users of ``rating_true``: a user with relevant items but no recommendations
counts as 0, recommendations for users without relevant items are ignored. Relevance is binary.

Beyond-accuracy metrics (coverage, intra-list diversity, novelty, serendipity) need other inputs
(catalog size, item vectors, training popularity, a primitive model's lists) and live in
``BEYOND_ACCURACY``. ``METRICS`` maps each
accuracy metric's ``__name__`` to the function so reports can name them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pandas as pd

USER, ITEM, PREDICTION = "user_id", "item_id", "prediction"


class ColumnMismatchError(ValueError):
    """A metric input lacks a column the metric needs."""


def _check_columns(fn: Callable) -> Callable:
    """Validate that both frames carry the named columns before any arithmetic."""

    @functools.wraps(fn)
    def wrapper(rating_true: pd.DataFrame, rating_pred: pd.DataFrame, k: int = 10,
                col_user: str = USER, col_item: str = ITEM,
                col_prediction: str = PREDICTION) -> float:
        for name, frame, cols in (("rating_true", rating_true, (col_user, col_item)),
                                  ("rating_pred", rating_pred,
                                   (col_user, col_item, col_prediction))):
            missing = [c for c in cols if c not in frame.columns]
            if missing:
                raise ColumnMismatchError(f"{name} lacks columns {missing}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return fn(rating_true, rating_pred, k, col_user, col_item, col_prediction)

    return wrapper


def top_k(rating_pred: pd.DataFrame, k: int, col_user: str = USER,
          col_prediction: str = PREDICTION) -> pd.DataFrame:
    """Each user's ``k`` best rows with a 1-based ``rank`` column (stable on ties)."""
    ordered = rating_pred.sort_values([col_user, col_prediction], ascending=[True, False],
                                      kind="stable")
    ordered = ordered.assign(rank=ordered.groupby(col_user, sort=False).cumcount() + 1)
    return ordered[ordered["rank"] <= k]


def _hits(rating_true: pd.DataFrame, rating_pred: pd.DataFrame, k: int, col_user: str,
          col_item: str, col_prediction: str) -> tuple[pd.DataFrame, pd.Series]:
    """(hit rows of the top-k with their rank, number of relevant items per evaluated user)."""
    n_rel = rating_true.drop_duplicates([col_user, col_item]).groupby(col_user).size()
    top = top_k(rating_pred, k, col_user, col_prediction)[[col_user, col_item, "rank"]]
    hits = top.merge(rating_true[[col_user, col_item]].drop_duplicates(),
                     on=[col_user, col_item])
    return hits[hits[col_user].isin(n_rel.index)], n_rel


def _per_user_mean(values: pd.Series, n_rel: pd.Series) -> float:
    """Average a per-user series over all evaluated users (missing users count 0)."""
    if len(n_rel) == 0:
        return 0.0
    return float(values.reindex(n_rel.index).fillna(0.0).mean())


@_check_columns
def precision_at_k(rating_true, rating_pred, k=10, col_user=USER, col_item=ITEM,
                   col_prediction=PREDICTION) -> float:
    """Precision@k = hits in top-k / k, averaged over users. min=0, max=1.

    Cannot reach 1 for a user with fewer than ``k`` relevant items (recommenders' convention:
    the denominator is ``k``, not the list length).
    """
    hits, n_rel = _hits(rating_true, rating_pred, k, col_user, col_item, col_prediction)
    return _per_user_mean(hits.groupby(col_user).size() / k, n_rel)


@_check_columns
def recall_at_k(rating_true, rating_pred, k=10, col_user=USER, col_item=ITEM,
                col_prediction=PREDICTION) -> float:
    """Recall@k = hits in top-k / relevant items of the user, averaged. min=0, max=1."""
    hits, n_rel = _hits(rating_true, rating_pred, k, col_user, col_item, col_prediction)
    return _per_user_mean(hits.groupby(col_user).size() / n_rel, n_rel)


@_check_columns
def ndcg_at_k(rating_true, rating_pred, k=10, col_user=USER, col_item=ITEM,
              col_prediction=PREDICTION) -> float:
    """NDCG@k with binary gains, averaged over users. min=0, max=1.

    DCG = sum over hits of 1 / log2(rank + 1); IDCG is the DCG of min(n_relevant, k) hits at
    ranks 1.. (Jarvelin & Kekalainen 2002, the form recommenders uses for binary relevance).
    """
    hits, n_rel = _hits(rating_true, rating_pred, k, col_user, col_item, col_prediction)
    dcg = (1.0 / np.log2(hits["rank"] + 1.0)).groupby(hits[col_user]).sum()
    discounts = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))
    idcg = pd.Series(discounts[np.minimum(n_rel.to_numpy(), k) - 1], index=n_rel.index)
    return _per_user_mean(dcg / idcg.reindex(dcg.index), n_rel)


@_check_columns
def map_at_k(rating_true, rating_pred, k=10, col_user=USER, col_item=ITEM,
             col_prediction=PREDICTION) -> float:
    """MAP@k: mean over users of AP@k = sum over hits of precision@rank / min(n_relevant, k).

    min=0, max=1. The min(n_relevant, k) normaliser is the usual AP@k (Kaggle ``ml_metrics.apk``,
    recommenders' ``map_at_k``), so a perfect top-k scores 1 even when a user has > k relevant.
    """
    hits, n_rel = _hits(rating_true, rating_pred, k, col_user, col_item, col_prediction)
    hits = hits.sort_values([col_user, "rank"])
    prec_at_hit = (hits.groupby(col_user).cumcount() + 1) / hits["rank"]
    denom = np.minimum(n_rel, k)
    return _per_user_mean(prec_at_hit.groupby(hits[col_user]).sum() / denom, n_rel)


@_check_columns
def mrr_at_k(rating_true, rating_pred, k=10, col_user=USER, col_item=ITEM,
             col_prediction=PREDICTION) -> float:
    """MRR@k: mean of 1 / rank of each user's first hit in the top-k (0 if none). min=0, max=1.

    Voorhees, TREC-8 QA track (1999).
    """
    hits, n_rel = _hits(rating_true, rating_pred, k, col_user, col_item, col_prediction)
    return _per_user_mean(1.0 / hits.groupby(col_user)["rank"].min(), n_rel)


@_check_columns
def hit_rate_at_k(rating_true, rating_pred, k=10, col_user=USER, col_item=ITEM,
                  col_prediction=PREDICTION) -> float:
    """HitRate@k: share of users with at least one relevant item in their top-k. min=0, max=1."""
    hits, n_rel = _hits(rating_true, rating_pred, k, col_user, col_item, col_prediction)
    return _per_user_mean(pd.Series(1.0, index=hits[col_user].unique()), n_rel)


def catalog_coverage(rating_pred: pd.DataFrame, n_items: int, k: int = 10,
                     col_user: str = USER, col_item: str = ITEM,
                     col_prediction: str = PREDICTION) -> float:
    """Distinct items in anyone's top-k / catalog size. min=0, max=1.

    Ge, Delgado-Battenfeld & Jannach, "Beyond accuracy" (RecSys 2010), prediction coverage.
    """
    top = top_k(rating_pred, k, col_user, col_prediction)
    return float(top[col_item].nunique() / n_items) if n_items else 0.0


def intra_list_diversity(rating_pred: pd.DataFrame, item_vectors: pd.DataFrame, k: int = 10,
                         col_user: str = USER, col_item: str = ITEM,
                         col_prediction: str = PREDICTION) -> float:
    """Mean over users of the mean pairwise cosine *distance* within the top-k. min=0, max=1.

    ``item_vectors`` is indexed by item id with non-negative feature columns (e.g. genre
    one-hots), so cosine similarity is in [0, 1]. Ziegler et al., "Improving recommendation lists
    through topic diversification" (WWW 2005). A list of fewer than 2 items scores 0; an item
    without a vector (zero vector) is at distance 1 from every other item.
    """
    top = top_k(rating_pred, k, col_user, col_prediction)
    vecs = item_vectors.reindex(top[col_item]).fillna(0.0).to_numpy(np.float64)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    unit = np.divide(vecs, norms, out=np.zeros_like(vecs), where=norms > 0)
    _, user_idx, counts = np.unique(top[col_user].to_numpy(), return_inverse=True,
                                    return_counts=True)
    # pad every user's list to k rows so all Gram matrices come from one einsum
    padded = np.zeros((len(counts), k, unit.shape[1]))
    padded[user_idx, top["rank"].to_numpy() - 1] = unit
    sims = np.einsum("ukf,ujf->ukj", padded, padded)
    n = counts.astype(np.float64)
    pairs = n * (n - 1)
    off_diag = sims.sum(axis=(1, 2)) - np.einsum("ukk->u", sims)
    ild = np.where(pairs > 0, 1.0 - off_diag / np.maximum(pairs, 1.0), 0.0)
    return float(ild.mean()) if len(ild) else 0.0


def novelty(rating_pred: pd.DataFrame, train: pd.DataFrame, k: int = 10,
            col_user: str = USER, col_item: str = ITEM,
            col_prediction: str = PREDICTION) -> float:
    """Mean self-information -log2(p(i)) of recommended items, in bits; min=0, unbounded above.

    p(i) = share of training users who interacted with item i (items never seen in training get
    p = 1 / n_users, the rarest observable). Zhou et al., PNAS 2010 ("Solving the apparent
    diversity-accuracy dilemma"); Castells et al., "Novelty and diversity metrics" (2011).
    """
    n_users = max(train[col_user].nunique(), 1)
    p = train.drop_duplicates([col_user, col_item]).groupby(col_item).size() / n_users
    top = top_k(rating_pred, k, col_user, col_prediction)
    if top.empty:
        return 0.0
    probs = top[col_item].map(p).fillna(1.0 / n_users).to_numpy(np.float64)
    return float(np.mean(-np.log2(probs)))


def serendipity(rating_true: pd.DataFrame, rating_pred: pd.DataFrame,
                primitive_pred: pd.DataFrame, k: int = 10, col_user: str = USER,
                col_item: str = ITEM, col_prediction: str = PREDICTION) -> float:
    """Serendipity@k: share of the top-k that is relevant AND unexpected, averaged. min=0, max=1.

    Ge, Delgado-Battenfeld & Jannach, "Beyond accuracy" (RecSys 2010), after Murakami et al.
    (2008): ``|UNEXP & USEFUL| / |RS|`` with ``UNEXP = RS - PM``, the recommendations not also
    made by a primitive model ``PM`` (here the user's top-k of ``primitive_pred``, e.g.
    popularity), ``USEFUL`` the relevant ones and ``|RS| = k`` (as for precision). Averaged over
    the users of ``rating_true`` like the accuracy metrics; the primitive model scores 0 itself.
    """
    hits, n_rel = _hits(rating_true, rating_pred, k, col_user, col_item, col_prediction)
    expected = top_k(primitive_pred, k, col_user, col_prediction)[[col_user, col_item]]
    hits = hits.merge(expected, on=[col_user, col_item], how="left", indicator=True)
    unexpected = hits[hits["_merge"] == "left_only"]
    return _per_user_mean(unexpected.groupby(col_user).size() / k, n_rel)


METRICS: dict[str, Callable[..., float]] = {
    fn.__name__: fn
    for fn in (precision_at_k, recall_at_k, ndcg_at_k, map_at_k, mrr_at_k, hit_rate_at_k)
}
BEYOND_ACCURACY: dict[str, Callable[..., float]] = {
    fn.__name__: fn for fn in (catalog_coverage, intra_list_diversity, novelty, serendipity)
}
