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
    ranker/model.txt              LightGBM text model
    ranker/cooc.npz               scipy CSR [n_items, n_items] item co-occurrence (recency features)
    features.json                 the ranker's ordered feature names + defaults (tandem.features)
    tuned.json                    the night's chosen hyper-parameters (tandem.tuning), when tuned
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
RANKER_MODEL = "ranker/model.txt"
RANKER_COOC = "ranker/cooc.npz"
FEATURE_SPEC = "features.json"
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
