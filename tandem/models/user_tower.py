"""The exported two-tower runtime, numpy only (serving imports this, never torch).

Loads ``two_tower/user_tower.npz`` written by ``tandem.models.two_tower.TwoTowerModel.export`` and
reproduces, to float32 rounding, the trained towers:

- user: ``normalize(relu([feats, pooled] @ user_w1 + user_b1) @ user_w2 + user_b2 + pooled)``
  where ``pooled`` is the mean of ``item_vectors`` over the user's recent items;
- fresh item (content only): ``normalize(relu(content @ content_w1 + content_b1) @ content_w2
  + content_b2)``.

Cost: one 128-wide MLP per user, a few microseconds (../shared/notes/perf-floor.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tandem.features.tower_features import ItemContentSpec, UserFeatureSpec

PAD = -1  # history slot with no item (same as tandem.models.two_tower.PAD)
# Beside the bundle's two_tower/ parts: float32 [m, d] vectors of a sample of training users,
# the queries that tune and measure the main ANN index (jobs.build_index).
QUERY_SAMPLE = "two_tower/query_sample.npy"
_WEIGHTS = ("user_w1", "user_b1", "user_w2", "user_b2",
            "content_w1", "content_b1", "content_w2", "content_b2")


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _mlp(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray,
         b2: np.ndarray) -> np.ndarray:
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


class UserTower:
    """Numpy user tower plus content-only item encoder.

    Parameters
    ----------
    weights : the float32 arrays named in ``_WEIGHTS``
    item_vectors : float32 ``[n_items, d]`` L2-normalised item vectors the histories index into
        (the bundle's ``two_tower/item_vectors.npy``, possibly extended with fresh items' rows)
    item_spec, user_spec : featurisers saved at training (None when not given to training)
    config : the training config as a dict (history_len, dim, ...)
    """

    def __init__(self, weights: dict[str, np.ndarray], item_vectors: np.ndarray,
                 item_spec: ItemContentSpec | None = None,
                 user_spec: UserFeatureSpec | None = None, config: dict | None = None):
        self.w = {k: np.asarray(weights[k], dtype=np.float32) for k in _WEIGHTS}
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.item_spec = item_spec
        self.user_spec = user_spec
        self.config = config or {}
        self.dim = self.w["user_w2"].shape[1]
        self.user_feat_dim = self.w["user_w1"].shape[0] - self.dim

    @classmethod
    def load(cls, path: Path, item_vectors: np.ndarray) -> UserTower:
        """Read an exported ``user_tower.npz``; ``item_vectors`` as in the class docstring."""
        with np.load(Path(path)) as z:
            weights = {k: z[k] for k in _WEIGHTS}
            item_spec, user_spec, config = (str(z[k]) for k in ("item_spec", "user_spec",
                                                                 "config"))
        return cls(weights, item_vectors,
                   ItemContentSpec.from_json(item_spec) if item_spec else None,
                   UserFeatureSpec.from_json(user_spec) if user_spec else None,
                   json.loads(config) if config else None)

    def encode_batch(self, user_feats: np.ndarray | None, histories: np.ndarray) -> np.ndarray:
        """float32 ``[m, d]`` L2-normalised user vectors.

        Parameters
        ----------
        user_feats : float32 ``[m, u]`` (None when the tower has no user features)
        histories : int ``[m, N]`` item rows of ``item_vectors``, ``PAD`` for empty slots
        """
        hist = np.asarray(histories, dtype=np.int64)
        m = len(hist)
        feats = (np.zeros((m, 0), np.float32) if user_feats is None
                 else np.asarray(user_feats, np.float32).reshape(m, -1))
        mask = (hist >= 0).astype(np.float32)
        pooled = (self.item_vectors[np.maximum(hist, 0)] * mask[..., None]).sum(1)
        pooled /= np.maximum(mask.sum(1, keepdims=True), 1.0)
        x = np.concatenate([feats, pooled], axis=1)
        w = self.w
        return _normalize(_mlp(x, w["user_w1"], w["user_b1"], w["user_w2"], w["user_b2"])
                          + pooled)

    def encode(self, user_feats: np.ndarray | None, history_item_idx: np.ndarray) -> np.ndarray:
        """float32 ``[d]`` vector of one user (features ``[u]``, history ``[n]`` item rows)."""
        feats = None if user_feats is None else np.asarray(user_feats, np.float32)[None, :]
        return self.encode_batch(feats, np.asarray(history_item_idx, np.int64)[None, :])[0]

    def encode_items(self, content: np.ndarray) -> np.ndarray:
        """float32 ``[m, d]`` content-only vectors of fresh items from content ``[m, c]``."""
        w = self.w
        x = np.asarray(content, np.float32)
        return _normalize(_mlp(x, w["content_w1"], w["content_b1"], w["content_w2"],
                               w["content_b2"]))
