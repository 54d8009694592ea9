"""Item feature rows in catalog order, as the ranker reads them per request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from tandem import features as F
from tandem import schema as s


@dataclass(frozen=True)
class ItemFeatures:
    """Item feature rows in catalog order, held in memory (the fast path).

    Attributes
    ----------
    static : float32 [n_items, len(F.ITEM_FEATURES)], time columns filled per request
    last_event_ts, created_at : float64 [n_items] epoch ms (0 = unknown)
    """

    static: np.ndarray
    last_event_ts: np.ndarray
    created_at: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, item_ids: pd.Index) -> ItemFeatures:
        """Raw ``F.ITEM_FIELDS`` rows keyed by ``item_id``; catalog items without a row get
        defaults (a new item reads like the feature store's default row)."""
        frame = frame.drop_duplicates(s.ITEM_ID, keep="last").set_index(s.ITEM_ID)
        aligned = frame.reindex(item_ids)
        static, last_ts, created = F.item_static_matrix(
            {c: aligned[c].to_numpy(object) for c in aligned.columns})
        return cls(static, last_ts, created)

    def take(self, rows: np.ndarray, now_ms: int) -> np.ndarray:
        """Feature rows [len(rows), n_item_features] relative to ``now_ms``."""
        return F.fill_item_times(np.take(self.static, rows, axis=0), self.last_event_ts[rows],
                                 self.created_at[rows], now_ms)


class ItemTable(Protocol):
    """Item features in catalog order: ``static`` [n, n_item_features] and ``take(rows, now)``
    (``ItemFeatures`` here, or ``tandem.feature_store.ItemFeatureTable`` over Feast)."""

    @property
    def static(self) -> np.ndarray: ...

    def take(self, rows: np.ndarray, now_ms: int) -> np.ndarray: ...


ItemTableFactory = Callable[[np.ndarray], ItemTable]  # catalog item ids -> aligned table
