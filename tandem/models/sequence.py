"""The exported session sequence model (SASRec-style), numpy only: serving imports this, not torch.

A user's recent items, oldest to newest, are right-aligned in ``max_len`` positions (left slots
empty) and run through ``n_blocks`` pre-LayerNorm Transformer blocks with CAUSAL single-head
self-attention (Kang & McAuley, ICDM 2018)::

    x_t   = E[item_t] * sqrt(d) + P[t]            (0 for an empty slot)
    block : x = x + Attn(LN1(x)) Wo ;  x = x + relu(LN2(x) W1 + b1) W2 + b2   (empty slots -> 0)
    h     = LN_final(x)

Position ``t`` attends to positions ``s <= t`` holding an item (and to itself), so ``h_t`` is a
function of the first ``t`` items only. The query of a user is ``h`` at the newest position, and
an item's score is ``h . E[item]``: the item embedding is shared with the output layer, so the
bundle's ``sequence/item_vectors.npy`` IS ``E`` and one FAISS inner-product ("mips") index
(``index/sequence.faiss``) answers the retrieval query; ``sequence/model.npz`` holds the rest.

The weights are written by ``tandem.models.sequence_train.SequenceModel.export``, which trains the
same formulas in PyTorch; a test holds the two to float32 rounding. Cost per request: two blocks
over at most ``max_len`` x ``dim`` (50 x 64), ~0.1 ms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PAD = -1  # history slot with no item (same as tandem.models.user_tower.PAD)
LN_EPS = 1e-5


def block_names(i: int) -> tuple[str, ...]:
    """Weight names of block ``i`` (the export's npz keys; ``x @ w`` orientation)."""
    return tuple(f"b{i}_{n}" for n in ("ln1_w", "ln1_b", "wq", "wk", "wv", "wo", "ln2_w",
                                         "ln2_b", "w1", "b1", "w2", "b2"))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * w + b


def right_aligned(histories: np.ndarray, max_len: int) -> np.ndarray:
    """int64 ``[m, max_len]`` chronological rows (newest last, ``PAD`` on the left) from
    newest-first ``PAD``-filled histories ``[m, N]`` (the layout every caller keeps)."""
    hist = np.asarray(histories, dtype=np.int64)[:, :max_len]
    out = np.full((len(hist), max_len), PAD, dtype=np.int64)
    out[:, max_len - hist.shape[1]:] = hist[:, ::-1]
    # a PAD between items (an unknown id) is squeezed out: PADs first, items keep their order
    return np.take_along_axis(out, np.argsort(out >= 0, axis=1, kind="stable"), axis=1)


class SequenceEncoder:
    """Numpy forward pass of the exported sequence model.

    Parameters
    ----------
    weights : the float32 arrays of the export (``pos_emb [L, d]``, ``ln_w``/``ln_b`` and
        :func:`block_names` of each block)
    item_vectors : float32 ``[n_items, d]``, the shared item embedding ``E`` (the bundle's
        ``sequence/item_vectors.npy``, which the FAISS index also holds)
    config : the training config as a dict (``max_len``, ``n_blocks``, ``dim``, ...)
    """

    def __init__(self, weights: dict[str, np.ndarray], item_vectors: np.ndarray, config: dict):
        self.w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        self.w["item_emb"] = self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.config = config
        self.max_len = int(config["max_len"])
        self.n_blocks = int(config["n_blocks"])
        self.dim = self.item_vectors.shape[1]

    @classmethod
    def load(cls, path: Path, item_vectors: np.ndarray) -> SequenceEncoder:
        """Read an exported ``sequence/model.npz`` (``item_vectors`` as in the class doc)."""
        with np.load(Path(path)) as z:
            config = json.loads(str(z["config"]))
            weights = {k: z[k] for k in z.files if k != "config"}
        return cls(weights, item_vectors, config)

    def hidden(self, chrono: np.ndarray) -> np.ndarray:
        """float32 ``[m, L, d]`` outputs of every position of right-aligned rows ``[m, L]``."""
        w = self.w
        seq = np.asarray(chrono, dtype=np.int64)
        valid = seq >= 0
        x = w["item_emb"][np.maximum(seq, 0)] * np.float32(np.sqrt(self.dim)) + w["pos_emb"]
        x = x * valid[..., None]
        length = seq.shape[1]
        allowed = np.tril(np.ones((length, length), dtype=bool))[None] & (
            valid[:, None, :] | np.eye(length, dtype=bool)[None])
        for i in range(self.n_blocks):
            (ln1_w, ln1_b, wq, wk, wv, wo, ln2_w, ln2_b, w1, b1, w2, b2) = (
                w[n] for n in block_names(i))
            a = layer_norm(x, ln1_w, ln1_b)
            logits = (a @ wq) @ (a @ wk).transpose(0, 2, 1) / np.float32(np.sqrt(self.dim))
            logits = np.where(allowed, logits, -np.inf)
            att = np.exp(logits - logits.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            x = (x + (att @ (a @ wv)) @ wo) * valid[..., None]
            f = layer_norm(x, ln2_w, ln2_b)
            x = (x + np.maximum(f @ w1 + b1, 0.0) @ w2 + b2) * valid[..., None]
        return layer_norm(x, w["ln_w"], w["ln_b"]).astype(np.float32)

    def encode_batch(self, histories: np.ndarray) -> np.ndarray:
        """float32 ``[m, d]`` query vectors from newest-first ``PAD``-filled histories ``[m, N]``
        (item rows of ``item_vectors``); a row without items gets a zero vector."""
        chrono = right_aligned(histories, self.max_len)
        out = self.hidden(chrono)[:, -1]
        return out * (chrono[:, -1] >= 0)[:, None]

    def encode(self, history_item_idx: np.ndarray) -> np.ndarray:
        """float32 ``[d]`` query of one user (``[n]`` item rows, newest first)."""
        return self.encode_batch(np.asarray(history_item_idx, np.int64)[None, :])[0]
