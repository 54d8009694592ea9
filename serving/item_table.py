"""Item feature rows in catalog order, as the ranker reads them per request."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from serving import shared_memory as shm
from tandem import schema as s
from tandem.features import entity as F


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

    @classmethod
    def shared(cls, path: Path, item_ids: np.ndarray, folder: Path | None = None
               ) -> ItemFeatures:
        """:meth:`from_frame` of the parquet at ``path`` for catalog ``item_ids``, built once
        per (file, catalog) and memory-mapped (``serving.shared_memory.derived_arrays``):
        ``--processes N`` holds one copy (1M items: ~140 MB), and only the first process reads
        the parquet."""
        ids = np.asarray(item_ids, dtype=str)
        key = shm.key_of(Path(path).resolve(), hashlib.sha256(ids.tobytes()).hexdigest(),
                         ids.dtype.str)
        names = [f.name for f in fields(cls)]

        def build() -> dict[str, np.ndarray]:
            table = cls.from_frame(pd.read_parquet(path), pd.Index(ids.astype(object)))
            return {name: getattr(table, name) for name in names}

        return cls(**shm.derived_arrays(key, names, build, folder))

    def take(self, rows: np.ndarray, now_ms: int) -> np.ndarray:
        """Feature rows [len(rows), n_item_features] relative to ``now_ms``."""
        return F.fill_item_times(np.take(self.static, rows, axis=0), self.last_event_ts[rows],
                                 self.created_at[rows], now_ms)


class SharedItemTable:
    """An online-store item table (``tandem.features.online.ItemFeatureTable``) read once per
    (catalog, materialization watermark) by whichever server process asks first, written as
    :class:`ItemFeatures` arrays and mapped by every process (1M items: ~140 MB each would
    otherwise hold, and read from the store, on its own).

    ``refresh()`` (``serving.item_refresh.MaterializationWatcher`` calls it after each
    materialization) maps the new watermark's arrays in one assignment, then deletes the
    files of the watermark it left: processes still mapping them keep their pages (an unlinked
    file lives while mapped), and one that asks for them again reads the store again.

    Parameters
    ----------
    read : catalog item ids -> a table with ``arrays`` (static, last_event_ts, created_at)
    watermark : the online store's materialization watermark (part of the files' key)
    item_ids : the catalog in row order
    """

    def __init__(self, read: Callable[[np.ndarray], object], watermark: Callable[[], object],
                 item_ids: np.ndarray, folder: Path | None = None):
        self._read, self._watermark, self._folder = read, watermark, folder
        self.item_ids = np.asarray(item_ids, dtype=str)
        self._digest = hashlib.sha256(self.item_ids.tobytes()).hexdigest()
        self._key: str | None = None
        self.refresh()

    def refresh(self) -> None:
        names = [f.name for f in fields(ItemFeatures)]
        key = shm.key_of("online item table", self._digest, self.item_ids.dtype.str,
                         self._watermark())

        def read() -> dict[str, np.ndarray]:
            return dict(zip(names, self._read(self.item_ids.astype(object)).arrays,
                            strict=True))

        self.table = ItemFeatures(**shm.derived_arrays(key, names, read, self._folder))
        left, self._key = self._key, key
        if left not in (None, key):
            shm.remove_derived(left, names, self._folder)

    @property
    def static(self) -> np.ndarray:
        return self.table.static

    def take(self, rows: np.ndarray, now_ms: int) -> np.ndarray:
        return self.table.take(rows, now_ms)


class ItemTable(Protocol):
    """Item features in catalog order: ``static`` [n, n_item_features] and ``take(rows, now)``
    (``ItemFeatures`` here, or ``tandem.features.online.ItemFeatureTable`` over Feast)."""

    @property
    def static(self) -> np.ndarray: ...

    def take(self, rows: np.ndarray, now_ms: int) -> np.ndarray: ...


ItemTableFactory = Callable[[np.ndarray], ItemTable]  # catalog item ids -> aligned table
