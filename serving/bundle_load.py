"""What an :class:`serving.engine.Engine` loads from a bundle folder besides the models: the
catalog (with the hourly new items of ``jobs/embed_new_items.py``), the user index, the item
co-occurrence and the ALS configuration the night fitted.

Large arrays are mapped through :mod:`serving.shared_memory`, keyed by the bundle's files, so
every serving process on a host shares one copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from serving import item_deltas
from serving import shared_memory as shm
from serving.id_index import ARRAYS as ID_ARRAYS
from serving.id_index import IdIndex
from tandem import schema as s
from tandem.models import bundle as B
from tandem.models.ann import AnnIndex

CATALOG_ARRAYS = (*ID_ARRAYS, "popularity", "created_at")  # the catalog's mapped arrays


def load_catalog(root: Path, deltas_dir: str | None, folder: Path | None
             ) -> tuple[dict[str, np.ndarray], B.ItemDelta | None]:
    """The catalog's mapped arrays (``IdIndex`` arrays, popularity, created_at) and the delta
    they include: ``items.parquet``'s rows, plus the newest hourly delta's items the bundle
    does not have (``serving.item_deltas``), each set written once per (bundle file, delta)."""
    items = root / B.ITEMS
    base = shm.derived_arrays(shm.key_of(items), CATALOG_ARRAYS,
                              lambda: catalog_arrays(pd.read_parquet(items)), folder)
    delta = item_deltas.load(root, deltas_dir, IdIndex(*(base[n] for n in ID_ARRAYS)))
    if delta is None or len(delta.item_ids) == 0:
        return base, delta
    key = shm.key_of(items, str(item_deltas.folder(root, deltas_dir)), delta.stamp)
    return shm.derived_arrays(key, CATALOG_ARRAYS, lambda: catalog_arrays(
        item_deltas.extend_items(pd.read_parquet(items), delta)), folder), delta


def with_new_items(root: Path, delta: B.ItemDelta, deltas_dir: str | None, n_items: int,
                    folder: Path | None) -> tuple[AnnIndex, np.ndarray]:
    """The two-tower index and item vectors with the delta's items added (rows past the
    bundle's), each built once per (bundle, delta) and mapped."""
    vectors, index = root / B.TT_ITEM_VECTORS, root / B.INDEX_MAIN
    key = shm.key_of(vectors, index, str(item_deltas.folder(root, deltas_dir)), delta.stamp,
                     n_items)

    base = shm.load_array(vectors)  # mapped: its shape costs nothing

    def extended_index() -> AnnIndex:
        private = AnnIndex.load(index)
        item_deltas.add_to_index(private, delta, len(base), base.shape[1])
        return private

    return (shm.derived_index(key, extended_index, folder),
            shm.derived_arrays(key, ["vectors"], lambda: {"vectors": item_deltas.extend_vectors(
                base, delta, n_items)}, folder)["vectors"])


def catalog_arrays(items: pd.DataFrame) -> dict[str, np.ndarray]:
    return {**IdIndex.arrays(items[s.ITEM_ID].astype(str)),
            "popularity": items["popularity"].to_numpy(np.float32),
            "created_at": items[s.CREATED_AT].to_numpy(np.int64)}


def load_user_index(root: Path, folder: Path | None) -> IdIndex:
    """The bundle's users (rows of the ALS user factors), mapped; empty without ``users``."""
    users = root / B.USERS
    if not users.exists():
        return IdIndex.of([])
    return IdIndex(**shm.derived_arrays(shm.key_of(users), ID_ARRAYS, lambda: IdIndex.arrays(
        pd.read_parquet(users, columns=[s.USER_ID])[s.USER_ID].astype(str)), folder))


def load_cooc(root: Path, n_items: int, folder: Path | None):
    """The ranker's co-occurrence matrix (CSR, and canonical CSC for the serving lookups) if
    the bundle ships one, else an empty one, mapped; items added after the build
    (``serving.item_deltas``) get empty rows and columns."""
    import scipy.sparse as sp

    path = root / getattr(B, "RANKER_COOC", "ranker/cooc.npz")
    parts = ("data", "indices", "indptr")

    def build() -> dict[str, np.ndarray]:
        if path.exists():
            cooc = sp.load_npz(path).tocsr().astype(np.float32)
            cooc.resize((n_items, n_items))
        else:
            cooc = sp.csr_matrix((n_items, n_items), dtype=np.float32)
        csc = sp.csc_matrix(cooc)
        csc.sum_duplicates()
        return {**{f"row_{p}": getattr(cooc, p) for p in parts},
                **{f"col_{p}": getattr(csc, p) for p in parts}}

    key = shm.key_of(path if path.exists() else "no cooc", n_items)
    arrays = shm.derived_arrays(key, [f"{side}_{p}" for side in ("row", "col") for p in parts],
                                build, folder)
    shape = (n_items, n_items)
    return (sp.csr_matrix(tuple(arrays[f"row_{p}"] for p in parts), shape=shape, copy=False),
            sp.csc_matrix(tuple(arrays[f"col_{p}"] for p in parts), shape=shape, copy=False))


def fitted_als_config(root: Path) -> dict[str, Any]:
    """The ALS configuration the bundle's factors were fitted with (``als/meta.json``, the
    night's tuned values included); the defaults for a bundle without one."""
    meta = (root / B.ALS_ITEM_FACTORS).with_name("meta.json")
    return json.loads(meta.read_text()).get("config", {}) if meta.exists() else {}
