"""The naive baseline server: the original design's request path, on the same bundle and data.

Differences from Tandem's engine, all on the hot path:

- item features: Feast SDK ``get_online_features`` for ALL candidates on every request (Tandem
  holds them in memory, loaded once per model);
- ALS retrieval: exact scoring of every item (``item_factors @ user``, then top-k) instead of the
  IVF index;
- ranker: stock LightGBM (``--ranker-backend lightgbm``; Tandem compiles it with lleaves).

Run like ``python -m serving.server``, with the same flags: ``python -m bench.naive_server``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from serving.engine import Engine  # noqa: E402
from serving.server import main  # noqa: E402
from tandem import schema as s  # noqa: E402
from tandem.features import entity as F  # noqa: E402
from tandem.models.ann import AnnIndex  # noqa: E402


class NaiveEngine(Engine):
    """Engine with per-request Feast item reads and exact ALS scoring."""

    feast = None  # set by main(): the FeatureStore the App's online store reads

    def _search(self, index: AnnIndex, queries: np.ndarray, k: int) -> np.ndarray:
        if index is not self.als_index:
            return super()._search(index, queries, k)
        scores = np.atleast_2d(queries).astype(np.float32) @ self.als_items.T  # [m, n_items]
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        return np.take_along_axis(top, order, axis=1)

    def _item_matrix(self, rows: np.ndarray, now_ms: int) -> np.ndarray:
        from tandem.features.feature_store import ITEM_REFS

        cols = NaiveEngine.feast.get_online_features(
            features=list(ITEM_REFS),
            entity_rows=[{s.ITEM_ID: i} for i in self.item_ids[rows].tolist()]).to_dict()
        return F.item_matrix(cols, now_ms)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from tandem.config import Paths
    from tandem.features import feature_store

    home = sys.argv[sys.argv.index("--feast-home") + 1]
    NaiveEngine.feast = feature_store.open_store(Paths(Path(home).resolve()))
    main(engine_cls=NaiveEngine)
