"""LightGBM lambdarank ranker over :mod:`tandem.features.ranking_features` rows.

One group per (user, request): the candidates retrieval produced for that user. Labels are graded
relevance (0 = not engaged, 1 = positive). Models are small on purpose (50-200 trees, 7-31
leaves): the quality probe saw bigger ones overfit on ml-100k, and the ranker dominates serving
latency (``../shared/notes/perf-floor.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from tandem.features.ranking_features import FEATURE_NAMES

RANKER_CONFIG: dict[str, Any] = {
    "objective": "lambdarank",
    "n_estimators": 150,
    "num_leaves": 15,
    "learning_rate": 0.05,
    "min_child_samples": 50,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
    "reg_lambda": 1.0,
    "lambdarank_truncation_level": 20,
    "random_state": 42,
    "n_jobs": 1,
    "verbose": -1,
}


def group_sizes(group_keys: np.ndarray) -> np.ndarray:
    """Sizes of the consecutive runs of equal keys (rows must be sorted by group)."""
    if len(group_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(group_keys[1:] != group_keys[:-1]) + 1]
    return np.diff(np.r_[starts, len(group_keys)])


def sample_negatives(labels: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Row mask [n]: every positive, and each negative with probability ``rate`` (seeded).

    Keeps row order, so groups stay contiguous; cuts training time roughly by ``1 / rate``
    with the candidate distribution (what retrieval returns) unchanged.
    """
    if rate >= 1.0:
        return np.ones(len(labels), dtype=bool)
    return (labels > 0) | (np.random.default_rng(seed).random(len(labels)) < rate)


def training_rows(labels: np.ndarray, explicit_negative: np.ndarray, group_keys: np.ndarray,
                  rate: float, seed: int) -> np.ndarray:
    """Row mask [n] of the candidates the ranker learns from.

    Groups without a positive carry no lambdarank gradient and are dropped. In the others every
    positive and every EXPLICIT negative is kept -- a candidate the user was shown and did not
    engage with, or rated below the positive threshold (``lake/labels/ranking`` label 0,
    ``lake/negatives/ranking``) -- and the implicit ones (retrieved, never shown, never
    engaged: unknown rather than disliked) with probability ``rate``
    (:func:`sample_negatives`). An explicit negative is the one the feed must learn to push
    down, so it is never thinned out.
    """
    has_positive = pd.Series(labels > 0).groupby(group_keys).transform("any").to_numpy()
    keep = sample_negatives(labels, rate, seed) | (explicit_negative & (labels == 0))
    return has_positive & keep


def train_ranker(features: np.ndarray, labels: np.ndarray, group_keys: np.ndarray,
                 cfg: dict[str, Any] = RANKER_CONFIG) -> lgb.LGBMRanker:
    """Fit lambdarank on rows sorted by group.

    Parameters
    ----------
    features : float32 [n, len(FEATURE_NAMES)]
    labels : int [n], relevance grades >= 0
    group_keys : [n] group id of each row (e.g. the user row), rows of a group contiguous.
        Groups without any positive carry no lambdarank gradient; callers usually drop them.
    """
    model = lgb.LGBMRanker(**cfg)
    model.fit(features, labels, group=group_sizes(group_keys), feature_name=list(FEATURE_NAMES))
    return model


def predict(model: lgb.LGBMRanker | lgb.Booster, features: np.ndarray) -> np.ndarray:
    """Scores [n] float64 (higher = better; comparable within one group only)."""
    booster = model.booster_ if isinstance(model, lgb.LGBMRanker) else model
    return booster.predict(features, num_threads=1)


def save(model: lgb.LGBMRanker, path: Path) -> None:
    """LightGBM text model (loadable by ``lgb.Booster(model_file=...)``, lleaves, MLflow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.booster_.save_model(str(path))


def load(path: Path) -> lgb.Booster:
    return lgb.Booster(model_file=str(path))
