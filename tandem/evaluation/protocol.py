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
- **re-ranking**: the two-stage lists are shown through serving's MMR / genre cap / calibration
  to the user's genre profile (``tandem.policy.diversify``); the ranked lists are computed once and
  re-ranked with every (``mmr_lambda``, ``genre_cap``, ``calibration``) of ``diversify_grid``, and
  the setting is chosen on the first
  inner split's held-out users (``tandem.evaluation.diversify_sweep``), never on the test split.
- **tuning** (``cfg["tune"]``: a ``tandem.config.TuningSettings``; absent by default): Optuna
  studies (``tandem.evaluation.tuning``) choose ALS's, the two-tower's and the ranker's parameters
  by NDCG@10 on the inner split -- the test period is never seen -- and every later fit uses the
  choice.

Entity features are computed point-in-time at each user's request time (the time of the user's
first held-out event) with the :mod:`tandem.features.entity` transforms, from raw rows that
:mod:`tandem.evaluation.point_in_time` derives from the history (the item rows from
:class:`tandem.data.item_events.ItemEvents`, every history event in four numpy columns, which
the nightly jobs stream from the lake instead of loading the window); the feature store's
historical path serves the same raw fields to ``jobs/train_ranker.py``.

This module holds the protocol's configuration, the split and the catalog; the retrieval sources
are in :mod:`tandem.evaluation.sources`, the requests and the ranker's matrix in
:mod:`tandem.evaluation.requests`, and the run itself (:func:`tandem.evaluation.offline.evaluate`)
in :mod:`tandem.evaluation.offline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tandem import schema as S
from tandem.data.dataset import Dataset, positives
from tandem.evaluation import diversify_sweep as DS
from tandem.models import als as A
from tandem.models import ranker as R
from tandem.policy import diversify as D

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
    # nested inner temporal splits the ranker's requests come from: each adds one labelled
    # request per user, at an earlier time. On ml-100k a third (over two) raised the ranker's own
    # NDCG@10 on the validation split from 0.200 to 0.207 and on test from 0.207 to 0.210 (means
    # over three LightGBM seeds); each costs one more fit of the sources
    "ranker_splits": 3,
    # TwoTowerConfig overrides; None disables the source. One thread: deterministic, and
    # OpenMP spinning made 2 threads ~10x slower on a busy 2-core machine.
    "two_tower": {"num_threads": 1},
    "sequence": {"num_threads": 1},  # SequenceConfig overrides; None disables the source
    "sequence_k": 200,
    "content_k": 100,  # genre-profile candidates, as serving's ``n_content``; 0 disables
    "diversify": D.DIVERSIFY_CONFIG,  # serving's re-ranking defaults, applied to two-stage
    # (mmr_lambda, genre_cap, calibration) grid re-ranking the two-stage lists; chosen on the
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


# ---------------------------------------------------------------------------------------- index

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


def _indexed(events: pd.DataFrame, catalog: Catalog) -> pd.DataFrame:
    """Events with int ``user_idx``/``item_idx`` columns added."""
    return events.assign(user_idx=catalog.user_ids.get_indexer(events[S.USER_ID]),
                         item_idx=catalog.item_ids.get_indexer(events[S.ITEM_ID]))


