"""Merge candidate lists from several retrieval sources into one deduplicated, filtered pool.

Sources are numbered by bit (``SOURCE_BITS``); an item found by several sources keeps all their
bits and each source's retrieval score (NaN where a source did not return it), which the ranker
features and the response's explanation use. Everything is array arithmetic over the
concatenated lists: no Python loop over candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# order = bit position = column of CandidatePool.scores; names match the proto's CandidateSource
SOURCES: tuple[str, ...] = ("two_tower", "als", "session", "fresh", "popularity", "content",
                            "similar", "sequence")
SOURCE_BITS: dict[str, int] = {name: 1 << i for i, name in enumerate(SOURCES)}


@dataclass(frozen=True)
class CandidatePool:
    """Deduplicated candidates in ascending row order.

    Attributes
    ----------
    rows : int64 array [n]
        Catalog rows (bundle order), unique.
    source_mask : int64 array [n]
        OR of ``SOURCE_BITS`` of every source that returned the row.
    scores : float32 array [n, len(SOURCES)]
        Retrieval score per source, NaN where that source did not return the row.
    """

    rows: np.ndarray
    source_mask: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> CandidatePool:
        return CandidatePool(self.rows[positions], self.source_mask[positions],
                             self.scores[positions])

    def count_by_source(self) -> dict[str, int]:
        """How many pooled candidates each source contributed (an item counts for each)."""
        return {name: int(np.count_nonzero(self.source_mask & bit))
                for name, bit in SOURCE_BITS.items()}


def merge(lists: Sequence[tuple[str, np.ndarray, np.ndarray]], exclude: np.ndarray,
          n_items: int) -> CandidatePool:
    """Union ``(source, rows, scores)`` lists, drop excluded and invalid rows.

    Parameters
    ----------
    lists : sequence of (source name, int rows [m], float scores [m])
        Rows may repeat across lists and be -1 (FAISS pads short results with -1).
    exclude : int array
        Rows never to return (seen, explicitly excluded); -1 entries are ignored.
    n_items : int
        Catalog size; rows outside ``[0, n_items)`` are dropped.
    """
    if lists:
        rows = np.concatenate([np.asarray(r, dtype=np.int64).ravel() for _, r, _ in lists])
        scores = np.concatenate([np.asarray(s, dtype=np.float32).ravel() for _, _, s in lists])
        col = np.concatenate([np.full(len(np.ravel(r)), SOURCES.index(n), dtype=np.int64)
                              for n, r, _ in lists])
    else:
        rows, scores, col = (np.zeros(0, np.int64), np.zeros(0, np.float32),
                             np.zeros(0, np.int64))
    keep = (rows >= 0) & (rows < n_items) & ~np.isin(rows, exclude)
    rows, scores, col = rows[keep], scores[keep], col[keep]
    unique, inverse = np.unique(rows, return_inverse=True)
    mask = np.zeros(len(unique), dtype=np.int64)
    np.bitwise_or.at(mask, inverse, np.left_shift(1, col))
    table = np.full((len(unique), len(SOURCES)), np.nan, dtype=np.float32)
    table[inverse, col] = scores
    return CandidatePool(unique, mask, table)


def source_names(mask: int) -> list[str]:
    """Names of the sources set in one ``source_mask`` value (for building a reply)."""
    return [name for name, bit in SOURCE_BITS.items() if mask & bit]
