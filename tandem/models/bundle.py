"""The model bundle: one directory, registered in MLflow as ONE model version.

Serving loads a bundle by registry alias and never mixes parts of different runs. Every array is
indexed by the bundle's own catalog order: row ``i`` of every item array is ``items.parquet`` row
``i``; the same for users. Layout (all parts optional except manifest and items)::

    manifest.json                 BundleManifest (format, created_at, dataset, parts, metrics, ...)
    items.parquet                 item_id (str), popularity (float), created_at (ms) — catalog order
    users.parquet                 user_id (str) — row order of ALS user factors
    als/user_factors.npy          float32 [n_users, f]
    als/item_factors.npy          float32 [n_items, f]
    two_tower/item_vectors.npy    float32 [n_items, d], L2-normalised
    two_tower/user_tower.npz      numpy MLP weights (tandem.two_tower_export runs it without torch)
    index/main.faiss              ANN over two_tower/item_vectors (ids = catalog row)
    index/als.faiss               ANN over ALS item factors (inner-product -> L2 transform)
    sequence/item_vectors.npy     float32 [n_items, d], the sequence model's item embedding
    sequence/model.npz            its other weights (tandem.models.sequence runs them without torch)
    index/sequence.faiss          ANN over sequence/item_vectors ("mips")
    ranker/model.txt              LightGBM text model
    ranker/cooc.npz               scipy CSR [n_items, n_items] item co-occurrence (recency features)
    features.json                 the ranker's ordered feature names + defaults
    (tandem.features.entity) tuned.json                    the night's chosen hyper-parameters
    (tandem.evaluation.tuning), when tuned

Between nightly builds, ``jobs/embed_new_items.py`` adds the items created since: a versioned
sidecar per bundle, never inside it (the registered bundle stays byte-identical to its digest)::

    <models>/deltas/<bundle_key>/items-<stamp>.npz   ItemDelta: every item the bundle lacks
    <models>/deltas/<bundle_key>/items-<stamp>.json  its sha256 and size, written last

Each delta is cumulative (all items the bundle lacks up to ``stamp``), so serving applies only
the newest one and a lost hour loses nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
ITEMS = "items.parquet"
USERS = "users.parquet"
ALS_USER_FACTORS = "als/user_factors.npy"
ALS_ITEM_FACTORS = "als/item_factors.npy"
TT_ITEM_VECTORS = "two_tower/item_vectors.npy"
TT_USER_TOWER = "two_tower/user_tower.npz"
INDEX_MAIN = "index/main.faiss"
INDEX_ALS = "index/als.faiss"
SEQ_ITEM_VECTORS = "sequence/item_vectors.npy"
SEQ_MODEL = "sequence/model.npz"
SEQ_QUERY_SAMPLE = "sequence/query_sample.npy"  # tuning queries of index/sequence.faiss
INDEX_SEQUENCE = "index/sequence.faiss"
RANKER_MODEL = "ranker/model.txt"
RANKER_COOC = "ranker/cooc.npz"
FEATURE_SPEC = "features.json"
DELTAS = "deltas"  # under <models>, see the module docstring
TUNED_PARAMS = "tuned.json"


@dataclass
class BundleManifest:
    """What a bundle holds and where it came from; logged with the MLflow model version."""

    dataset: str
    parts: list[str]
    created_at: float = field(default_factory=time.time)
    format: int = BUNDLE_FORMAT
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)

    def save(self, bundle_dir: Path) -> Path:
        path = Path(bundle_dir) / MANIFEST
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, bundle_dir: Path) -> BundleManifest:
        data = json.loads((Path(bundle_dir) / MANIFEST).read_text())
        if data.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"bundle format {data.get('format')} != {BUNDLE_FORMAT}")
        return cls(**data)


def bundle_key(bundle_dir: Path) -> str:
    """The name a bundle's deltas are filed under: the sha256 of its ``manifest.json`` (unique
    per build: it holds the build time), the same for the nightly folder and a registry
    download of it (byte-identical, digest-checked)."""
    return hashlib.sha256((Path(bundle_dir) / MANIFEST).read_bytes()).hexdigest()[:24]


@dataclass(frozen=True)
class ItemDelta:
    """Items a bundle lacks, in the order they are appended to its catalog.

    Attributes
    ----------
    stamp : the hour it was built for (``YYYYmmddTHH``, UTC), orders the deltas
    item_ids : str array [m]; created_at : int64 [m] epoch ms
    vectors : float32 [m, d] content-only two-tower vectors (d = 0 in an ALS-only bundle)
    """

    stamp: str
    item_ids: np.ndarray
    created_at: np.ndarray
    vectors: np.ndarray

    def save(self, folder: Path) -> Path:
        """Write ``items-<stamp>.npz`` then its ``.json`` (sha256), each atomically: a reader
        never sees a delta without its digest, and a re-run overwrites the same files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        npz, meta = folder / f"items-{self.stamp}.npz", folder / f"items-{self.stamp}.json"
        tmp = folder / f".{npz.name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, item_ids=np.asarray(self.item_ids, dtype=str),
                     created_at=np.asarray(self.created_at, np.int64),
                     vectors=np.asarray(self.vectors, np.float32))
        os.replace(tmp, npz)
        digest = hashlib.sha256(npz.read_bytes()).hexdigest()
        tmp.write_text(json.dumps({"sha256": digest, "items": len(self.item_ids)}))
        os.replace(tmp, meta)
        return npz

    @classmethod
    def latest_stamp(cls, folder: Path) -> str | None:
        """The newest complete delta's stamp in ``folder`` (None: none); one directory listing."""
        stamps = sorted(p.stem.removeprefix("items-") for p in Path(folder).glob("items-*.json"))
        return stamps[-1] if stamps else None

    @classmethod
    def load(cls, folder: Path, stamp: str) -> ItemDelta:
        """Read one delta; ``ValueError`` when its bytes do not match the recorded sha256."""
        npz = Path(folder) / f"items-{stamp}.npz"
        meta = json.loads((Path(folder) / f"items-{stamp}.json").read_text())
        data = npz.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(f"{npz}: content does not match its sha256")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(stamp, z["item_ids"].astype(object), z["created_at"], z["vectors"])
