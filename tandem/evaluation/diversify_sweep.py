"""Choosing the re-ranking setting (MMR lambda, genre cap, calibration, MMR similarity) on a
validation split.

``make eval`` ranks each user's candidates once and then re-ranks the same scores with every
setting of a small grid (:data:`GRID`): re-ranking is cheap (``tandem.policy.diversify.rerank``, one
call per user), ranking is not. The setting is CHOSEN on the protocol's inner validation split
(``tandem.evaluation.protocol``) and only reported on the test split, so the choice cannot be tuned
to the one split the headline numbers come from.

Rule (:func:`choose`): among the settings whose validation coverage@k and diversity@k are at
least the ALS baseline's on the same validation users (the issue's target: a two-stage list no
narrower than ALS's), the one with the best validation NDCG@k; ties go to the earlier setting in
grid order (less re-ranking first). When none qualifies, the configured default stays.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from tandem.evaluation import metrics as M

# lambda 1.0 = the ranker's order; cap 0 = no genre quota; MMR's similarity over the genre sets
# or the served embeddings (tandem.policy.diversify)
GRID: dict[str, tuple] = {"mmr_lambda": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
                          "genre_cap": (0, 4, 3, 2), "calibration": (0.0, 1.0, 3.0),
                          "mmr_similarity": ("embedding", "genre")}
KEYS = ("mmr_lambda", "genre_cap", "calibration", "mmr_similarity")


def settings(grid: Mapping[str, Sequence], base: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every (mmr_lambda, genre_cap, calibration, mmr_similarity) of ``grid`` over ``base``
    (``mmr_pool`` and the rest), lambda-major in grid order; a grid without ``calibration`` or
    ``mmr_similarity`` keeps ``base``'s."""
    calibrations = grid.get("calibration", (base.get("calibration", 0.0),))
    similarities = grid.get("mmr_similarity", (base.get("mmr_similarity", "embedding"),))
    return [{**base, "mmr_lambda": float(lam), "genre_cap": int(cap), "calibration": float(c),
             "mmr_similarity": str(sim)}
            for lam, cap, c, sim in itertools.product(grid["mmr_lambda"], grid["genre_cap"],
                                                      calibrations, similarities)]


def list_metrics(pred: pd.DataFrame, rel: pd.DataFrame, n_items: int,
                 genre_vectors: pd.DataFrame, k: int) -> dict[str, float]:
    """NDCG@k, coverage@k and diversity@k (``tandem.evaluation.metrics``, as ``make eval`` reports
    them) of one model's ranked lists ``pred`` (user, item, prediction)."""
    return {f"ndcg@{k}": M.ndcg_at_k(rel, pred, k=k),
            f"coverage@{k}": M.catalog_coverage(pred, n_items, k),
            f"diversity@{k}": M.intra_list_diversity(pred, genre_vectors, k)}


def choose(validation: Sequence[Mapping[str, Any]], baseline: Mapping[str, float],
           default: Mapping[str, Any], k: int) -> tuple[dict[str, Any], bool]:
    """(the chosen ``{mmr_lambda, genre_cap, calibration, mmr_similarity}``, whether a setting
    met the rule) from ``validation`` rows (those keys and their metrics, grid order) and the
    ALS ``baseline``'s metrics on the same users; ``default`` when none qualifies."""
    ndcg, cov, div = f"ndcg@{k}", f"coverage@{k}", f"diversity@{k}"
    ok = [r for r in validation if r[cov] >= baseline[cov] and r[div] >= baseline[div]]
    if not ok:
        return {key: default[key] for key in KEYS}, False
    best = max(ok, key=lambda r: r[ndcg])  # max keeps the first of equal values
    return {key: best[key] for key in KEYS}, True
