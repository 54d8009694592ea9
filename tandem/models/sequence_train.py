"""Training of the session sequence model (SASRec-style, PyTorch) and its export.

The formulas are those of :mod:`tandem.models.sequence` (the numpy runtime serving runs). Training
examples are users' engaged items in time order -- the items a query history holds
(``tandem.features.query_history``: serving asks the model with the session's engaged items, so it
learns from the same kind of sequence) -- cut from the newest end into rows of ``max_len + 1`` items
(at most ``max_chunks_per_user`` rows per user, at most ``max_sequences`` rows in all, a seeded
sample): position ``t`` of a row's first ``max_len`` items predicts item ``t + 1`` when that item
is a POSITIVE engagement (what retrieval should find), so one row teaches every prefix at once
(causal attention) and an engaged-but-not-positive item is context, never a target.

Loss: sampled softmax of the true next item against ``n_negatives`` uniform catalog items shared
by the batch (uniform negatives need no logQ correction: their log-probability is a constant);
accidental hits are masked. The item embedding is shared by input and output, so the exported
``item_vectors`` are the retrieval index's vectors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tandem.models.bundle import SEQ_ITEM_VECTORS, SEQ_MODEL
from tandem.models.sequence import PAD, block_names
from tandem.models.two_tower import fit_minibatches


@dataclass
class SequenceConfig:
    """Hyper-parameters; the defaults train on MovieLens-100K in minutes on one thread.

    Attributes
    ----------
    dim : embedding width; max_len : items a query sees (L); n_blocks : Transformer blocks
    dropout : on embeddings, attention output and feed-forward output during training
    n_negatives : uniform catalog negatives per step, shared by the batch
    max_chunks_per_user, max_sequences : caps on training rows (see the module docstring)
    batch_size, epochs, lr, weight_decay : optimisation (Adam)
    max_steps : optimiser steps in all, whatever the rows (0 = no cap): the nightly cost bound
    num_threads : torch intra-op threads; random_state : seeds torch and numpy
    """

    dim: int = 64
    max_len: int = 50
    n_blocks: int = 2
    dropout: float = 0.2
    n_negatives: int = 256
    max_chunks_per_user: int = 4
    max_sequences: int = 1_000_000
    batch_size: int = 128
    epochs: int = 30
    # optimiser steps in all (0 = epochs only; see fit_minibatches): a [128, 50, 64] step is
    # ~0.1 s on one core, so ~3-4 min a night at any scale; MovieLens-100K needs ~570
    max_steps: int = 2_000
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_threads: int = 1
    random_state: int = 0
    show_progress: bool = False


def training_rows(users: np.ndarray, items: np.ndarray, ts: np.ndarray, cfg: SequenceConfig,
                  positive: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ``[r, max_len + 1]`` chronological rows, newest item last, ``PAD`` on the left;
    bool ``[r, max_len + 1]``, the slots holding a positive: the targets).

    Each user's items sorted by (ts, item) are cut from the newest end into chunks of
    ``max_len + 1``; chunks without a positive after their first item teach nothing and are
    dropped. ``positive`` [n] flags the positive engagements (None: every item is one).
    """
    width = cfg.max_len + 1
    positive = np.ones(len(items), bool) if positive is None else np.asarray(positive, bool)
    order = np.lexsort((items, ts, users))
    u, it, pos_sorted = users[order], items[order], positive[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1] if len(u) else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, len(u)])
    from_end = np.repeat(starts + lengths, lengths) - 1 - np.arange(len(u))  # 0 = newest
    chunk = from_end // width
    keep = chunk < cfg.max_chunks_per_user
    key = u[keep].astype(np.int64) * cfg.max_chunks_per_user + chunk[keep]
    row_keys, row = np.unique(key, return_inverse=True)
    out = np.full((len(row_keys), width), PAD, dtype=np.int32)
    target = np.zeros((len(row_keys), width), dtype=bool)
    slot = width - 1 - from_end[keep] % width
    out[row, slot] = it[keep]
    target[row, slot] = pos_sorted[keep]
    useful = (target[:, 1:] & (out[:, :-1] >= 0)).any(axis=1)
    out, target = out[useful], target[useful]
    if len(out) > cfg.max_sequences:
        rng = np.random.default_rng(cfg.random_state)
        pick = np.sort(rng.choice(len(out), size=cfg.max_sequences, replace=False))
        out, target = out[pick], target[pick]
    return out, target


class _SASRec(nn.Module):
    """The parameters and the training-time forward pass of :mod:`tandem.models.sequence`."""

    def __init__(self, n_items: int, cfg: SequenceConfig):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items, d)
        nn.init.normal_(self.item_emb.weight, std=1.0 / math.sqrt(d))
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_len, d) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(d), "wq": nn.Linear(d, d, bias=False),
            "wk": nn.Linear(d, d, bias=False), "wv": nn.Linear(d, d, bias=False),
            "wo": nn.Linear(d, d, bias=False), "ln2": nn.LayerNorm(d),
            "w1": nn.Linear(d, d), "w2": nn.Linear(d, d)}) for _ in range(cfg.n_blocks))
        self.ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``[b, L, d]`` outputs of right-aligned rows ``seq [b, L]`` (``PAD`` = empty)."""
        d, length = self.cfg.dim, seq.shape[1]
        valid = (seq >= 0).unsqueeze(-1).float()
        x = self.item_emb(seq.clamp(min=0)) * math.sqrt(d) + self.pos_emb[-length:]
        x = self.drop(x) * valid
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & (
            (seq >= 0)[:, None, :] | torch.eye(length, dtype=torch.bool)[None])
        for blk in self.blocks:
            a = blk["ln1"](x)
            logits = blk["wq"](a) @ blk["wk"](a).transpose(1, 2) / math.sqrt(d)
            att = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
            x = (x + self.drop(blk["wo"](att @ blk["wv"](a)))) * valid
            f = blk["ln2"](x)
            x = (x + self.drop(blk["w2"](F.relu(blk["w1"](f))))) * valid
        return self.ln(x)


class SequenceModel:
    """A trained sequence model over a fixed catalog (``n_items`` rows, catalog order).

    Attributes
    ----------
    net : the torch module (eval mode); cfg : the training configuration
    loss_history : mean training loss per epoch; n_rows : training rows used
    """

    def __init__(self, net: _SASRec, cfg: SequenceConfig, loss_history: list[float],
                 n_rows: int):
        self.net = net.eval()
        self.cfg = cfg
        self.loss_history = loss_history
        self.n_rows = n_rows

    def item_vectors(self) -> np.ndarray:
        """float32 ``[n_items, d]``: the shared item embedding."""
        return self.net.item_emb.weight.detach().numpy().copy()

    def weights(self) -> dict[str, np.ndarray]:
        """Every other weight under its :mod:`tandem.models.sequence` name (``x @ w``
        orientation)."""
        def t(x: torch.Tensor) -> np.ndarray:
            return x.detach().numpy().copy()

        out = {"pos_emb": t(self.net.pos_emb), "ln_w": t(self.net.ln.weight),
               "ln_b": t(self.net.ln.bias)}
        for i, blk in enumerate(self.net.blocks):
            values = (blk["ln1"].weight, blk["ln1"].bias, blk["wq"].weight.T, blk["wk"].weight.T,
                      blk["wv"].weight.T, blk["wo"].weight.T, blk["ln2"].weight, blk["ln2"].bias,
                      blk["w1"].weight.T, blk["w1"].bias, blk["w2"].weight.T, blk["w2"].bias)
            out.update({n: t(v) for n, v in zip(block_names(i), values, strict=True)})
        return out

    def encoder(self):
        """The numpy runtime (``tandem.models.sequence.SequenceEncoder``) of these weights."""
        from tandem.models.sequence import SequenceEncoder

        return SequenceEncoder(self.weights(), self.item_vectors(), asdict(self.cfg))

    def export(self, bundle_dir: Path) -> dict[str, Path]:
        """Write ``sequence/item_vectors.npy`` and ``sequence/model.npz`` under a bundle."""
        vec_path, model_path = Path(bundle_dir) / SEQ_ITEM_VECTORS, Path(bundle_dir) / SEQ_MODEL
        vec_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(vec_path, self.item_vectors())
        np.savez(model_path, **self.weights(), config=np.array(json.dumps(asdict(self.cfg))))
        return {"item_vectors": vec_path, "model": model_path}


def _batch_loss(net: _SASRec, rows: torch.Tensor, is_target: torch.Tensor, n_items: int,
                n_neg: int, gen: torch.Generator) -> torch.Tensor:
    """Sampled-softmax loss of the next item at every position whose next item is a positive."""
    h = net(rows[:, :-1])
    target = rows[:, 1:]
    has = is_target[:, 1:] & (rows[:, :-1] >= 0)
    h, target = h[has], target[has].long()
    negatives = torch.randint(0, n_items, (n_neg,), generator=gen)
    emb = net.item_emb.weight
    pos = (h * emb[target]).sum(-1, keepdim=True)
    neg = (h @ emb[negatives].T).masked_fill(negatives[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long))


def train_sequence(users: np.ndarray, items: np.ndarray, ts: np.ndarray, n_items: int,
                   cfg: SequenceConfig | None = None, positive: np.ndarray | None = None
                   ) -> SequenceModel:
    """Train on engaged interactions ``(users, items, ts)`` (int arrays ``[n]``, one per
    distinct (user, item), items are catalog rows ``< n_items``, ts any sortable time);
    ``positive`` [n] flags the ones that are targets (None: all)."""
    cfg = cfg or SequenceConfig()
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.random_state)
    gen = torch.Generator().manual_seed(cfg.random_state)
    rng = np.random.default_rng(cfg.random_state)
    rows_np, target_np = training_rows(np.asarray(users, np.int64), np.asarray(items, np.int64),
                                       np.asarray(ts), cfg, positive)
    rows, is_target = torch.from_numpy(rows_np), torch.from_numpy(target_np)
    net = _SASRec(n_items, cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_neg = min(cfg.n_negatives, n_items)
    net.train()
    losses = fit_minibatches(opt, len(rows), cfg.epochs if len(rows) else 0, cfg.batch_size, rng,
                             lambda idx: _batch_loss(net, rows[idx], is_target[idx], n_items,
                                                     n_neg, gen),
                             "sequence" if cfg.show_progress else None, cfg.max_steps)
    return SequenceModel(net, cfg, losses, len(rows))
