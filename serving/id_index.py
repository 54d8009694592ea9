"""Id -> row lookups held in plain arrays, so every server process maps one copy.

A ``pd.Index`` over the 1M-item catalog (or the bundle's 1M ALS users) is a Python string per
id plus a hash table: ~100 MB private to each server process, rebuilt by each. ``IdIndex``
keeps the ids as a fixed-width unicode array in row order, a sorted copy and the permutation
back to rows; ``serving.shared_memory`` writes the three once and every process maps them. A
lookup is one ``searchsorted`` over all the asked ids at once (O(log n) each, no Python loop).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

ARRAYS = ("ids", "sorted_ids", "order")  # what ``arrays`` returns and ``IdIndex`` takes


class IdIndex:
    """Unique ids in row order with ``pd.Index``-like lookups (``get_indexer``, ``get_loc``).

    Attributes
    ----------
    ids : unicode [n] in row order; ``sorted_ids`` : the same, sorted; ``order`` : int64 [n],
        the row of each sorted id
    """

    def __init__(self, ids: np.ndarray, sorted_ids: np.ndarray, order: np.ndarray):
        self.ids, self.sorted_ids, self.order = ids, sorted_ids, order

    @staticmethod
    def arrays(ids: Iterable[str]) -> dict[str, np.ndarray]:
        """The three arrays of an index over ``ids`` (row order kept)."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=str)
        order = np.argsort(ids, kind="stable")
        return {"ids": ids, "sorted_ids": ids[order], "order": order.astype(np.int64)}

    @classmethod
    def of(cls, ids: Iterable[str]) -> IdIndex:
        """An in-memory index over ``ids`` (tests, small catalogs)."""
        return cls(**cls.arrays(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows) -> np.ndarray:
        """Ids at ``rows`` (as ``pd.Index[rows]``)."""
        return self.ids[rows]

    def get_indexer(self, keys: Iterable[str]) -> np.ndarray:
        """Row of each of ``keys`` (int64, -1 for an unknown id), order kept."""
        keys = np.asarray(keys if isinstance(keys, np.ndarray) else list(keys), dtype=str)
        if len(self.sorted_ids) == 0 or keys.size == 0:
            return np.full(keys.shape, -1, dtype=np.int64)
        # searched in the index's own width: another dtype would make numpy cast all n ids
        # (~130 us at 1M); a longer key is cut here and then fails the equality check
        cut = keys.astype(self.sorted_ids.dtype)
        pos = np.minimum(np.searchsorted(self.sorted_ids, cut), len(self.sorted_ids) - 1)
        return np.where(self.sorted_ids[pos] == keys, self.order[pos], -1)

    def get_loc(self, key: str) -> int:
        """Row of ``key``; KeyError for an unknown id."""
        row = int(self.get_indexer([key])[0])
        if row < 0:
            raise KeyError(key)
        return row
