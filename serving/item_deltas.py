"""Items created since the nightly build, appended to a served bundle's catalog at engine load.

``jobs/embed_new_items.py`` files a cumulative ``tandem.models.bundle.ItemDelta`` per bundle every
hour under ``<deltas_dir>/<bundle_key>/``. An engine loads the newest one with its bundle: the
new items get catalog rows after the bundle's, their content-only two-tower vectors go into the
item vectors and the main FAISS index (``AnnIndex.add``), and they have no ALS factors (zero
rows: ALS cannot score an item nobody has engaged with yet). ``App.poll_once`` rebuilds an
engine from its already-downloaded bundle folder when a newer delta appears, so a new item is
retrievable after one hourly run, without a restart and without a new nightly version.

A delta that cannot be read or fails its sha256 is logged and skipped: the bundle serves as
built (a delta is an addition, never a reason to refuse a bundle).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tandem import schema as s
from tandem.models import bundle as B
from tandem.models.ann import AnnIndex

log = logging.getLogger(__name__)


def folder(bundle_dir: Path, deltas_dir: Path | str | None) -> Path | None:
    """Where the bundle's deltas are filed (None when serving reads no deltas)."""
    return None if not deltas_dir else Path(deltas_dir) / B.bundle_key(bundle_dir)


def latest_stamp(bundle_dir: Path, deltas_dir: Path | str | None) -> str | None:
    """The newest delta's stamp for this bundle (one directory listing), None if none."""
    where = folder(bundle_dir, deltas_dir)
    return None if where is None else B.ItemDelta.latest_stamp(where)


def moved(engine, deltas_dir: Path | str | None) -> bool:
    """Whether a newer delta than the one ``engine`` (a ``serving.engine.Engine``) loaded with
    is filed for its bundle."""
    applied = engine.item_delta.stamp if engine.item_delta is not None else None
    return latest_stamp(engine.bundle_dir, deltas_dir) not in (None, applied)


def load(bundle_dir: Path, deltas_dir: Path | str | None, known) -> B.ItemDelta | None:
    """The newest delta for this bundle, less any item ``known`` (an index with
    ``get_indexer``: ``serving.id_index.IdIndex``, ``pd.Index``) already has; None if none."""
    where = folder(bundle_dir, deltas_dir)
    stamp = None if where is None else B.ItemDelta.latest_stamp(where)
    if stamp is None:
        return None
    try:
        delta = B.ItemDelta.load(where, stamp)
    except (OSError, ValueError, KeyError):
        log.exception("item delta %s of %s unreadable; serving the bundle as built", stamp,
                      bundle_dir)
        return None
    new = known.get_indexer(delta.item_ids.astype(str)) < 0
    return B.ItemDelta(stamp, delta.item_ids[new].astype(str), delta.created_at[new],
                       delta.vectors[new])


def extend_items(items: pd.DataFrame, delta: B.ItemDelta | None) -> pd.DataFrame:
    """``items.parquet`` rows plus the delta's (popularity 0: nothing measured yet)."""
    if delta is None or len(delta.item_ids) == 0:
        return items
    extra = pd.DataFrame({s.ITEM_ID: delta.item_ids, "popularity": 0.0,
                          s.CREATED_AT: delta.created_at})
    return pd.concat([items, extra], ignore_index=True)


def pad_rows(matrix: np.ndarray, n_rows: int) -> np.ndarray:
    """``matrix`` with zero rows appended up to ``n_rows`` (the new items' ALS factors)."""
    if len(matrix) >= n_rows:
        return matrix
    return np.vstack([matrix, np.zeros((n_rows - len(matrix), matrix.shape[1]), matrix.dtype)])


def extend_vectors(vectors: np.ndarray, delta: B.ItemDelta | None, n_rows: int) -> np.ndarray:
    """Two-tower ``vectors`` with the delta's appended. A delta without vectors (ALS-only
    build) pads zero rows instead."""
    if delta is None or n_rows == len(vectors):
        return vectors
    if delta.vectors.shape[1] != vectors.shape[1]:
        return pad_rows(vectors, n_rows)
    return np.vstack([vectors, np.asarray(delta.vectors, dtype=vectors.dtype)])


def add_to_index(index: AnnIndex, delta: B.ItemDelta, first: int, dim: int) -> None:
    """Add the delta's vectors to ``index`` under catalog rows ``first, first + 1, ...`` (the
    rows :func:`extend_vectors` gives them); a delta without vectors adds nothing."""
    if len(delta.vectors) and delta.vectors.shape[1] == dim:
        index.add(np.asarray(delta.vectors, dtype=np.float32),
                  np.arange(first, first + len(delta.vectors), dtype=np.int64))
