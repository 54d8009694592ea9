"""Two-tower retrieval model (PyTorch): training and export.

User tower: ``normalize(MLP([user_feats, mean(item_vec[last N items])]) + mean(...))`` — a user
is described by profile features and the item-tower vectors of their most recent items, so a new
user (or a new session) gets a vector with no retraining and no user-id table.

Item tower: ``normalize(ContentMLP(content) + id_emb[item] * keep)``. During training each item's
id embedding is dropped with probability ``id_dropout`` (``keep = 0``), which trains the
content-only path that a NEW item, unseen in training, gets at export and in serving.

Loss: sampled softmax over in-batch items plus ``n_sampled_negatives`` uniform catalog items
("mixed negative sampling", Yang et al., WWW 2020). Every logit is corrected by the log of the
expected number of times its item appears among the sampled candidates (logQ correction, Yi et al.,
RecSys 2019): ``log(batch_size * q_item)`` for in-batch columns, with ``q_item`` the item's share
of training positives, and ``log(n_sampled / n_items)`` for the uniform columns. Accidental hits
(the positive appearing as a negative) are masked.

Each training example is one positive interaction (user, item, ts): the target is the item and
the history is the user's query history at ``ts`` (``tandem.features.query_history``: the last
``history_len`` distinct items engaged with before ``ts``, the target itself left out) -- the
items serving's user tower pools -- so the model learns "next item" from what it is served.

Serving never imports this module: :meth:`TwoTowerModel.export` writes the item vectors and the
tower weights that ``tandem.models.user_tower`` runs with numpy alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from tandem.features import query_history as QH
from tandem.features.tower_features import ItemContentSpec, UserFeatureSpec
from tandem.models.bundle import TT_ITEM_VECTORS, TT_USER_TOWER

PAD = -1  # history slot with no item


@dataclass
class TwoTowerConfig:
    """Hyper-parameters; the defaults train on MovieLens-100K in well under a minute on 2 cores.

    Attributes
    ----------
    dim : output vector size of both towers
    hidden : hidden width of the user MLP and the item content MLP
    history_len : how many of the user's most recent items the user tower pools
    id_dropout : probability, per item and step, that its id embedding is dropped (content-only)
    temperature : softmax temperature on cosine similarities
    n_sampled_negatives : uniform catalog negatives per step, shared by the batch
    batch_size, epochs, lr, weight_decay : optimisation (Adam)
    max_steps : optimiser steps in all, whatever the rows (0 = no cap): the nightly cost bound
    num_threads : torch intra-op threads during training
    random_state : seeds torch and numpy
    show_progress : print one line per epoch
    """

    dim: int = 64
    hidden: int = 128
    history_len: int = 20
    id_dropout: float = 0.3
    temperature: float = 0.1
    n_sampled_negatives: int = 256
    batch_size: int = 512
    epochs: int = 5
    max_steps: int = 5_000  # optimiser steps in all (0 = epochs only): see fit_minibatches
    lr: float = 3e-3
    weight_decay: float = 1e-6
    num_threads: int = 2
    random_state: int = 0
    show_progress: bool = False


class _Towers(nn.Module):
    """The parameters of both towers (see the module docstring for the formulas)."""

    def __init__(self, n_items: int, content_dim: int, user_dim: int, cfg: TwoTowerConfig):
        super().__init__()
        self.id_emb = nn.Embedding(n_items, cfg.dim)
        nn.init.normal_(self.id_emb.weight, std=0.01)
        self.content = nn.Sequential(nn.Linear(content_dim, cfg.hidden), nn.ReLU(),
                                     nn.Linear(cfg.hidden, cfg.dim))
        self.user = nn.Sequential(nn.Linear(user_dim + cfg.dim, cfg.hidden), nn.ReLU(),
                                  nn.Linear(cfg.hidden, cfg.dim))

    def item_raw(self, content: torch.Tensor, ids: torch.Tensor | None,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised item vectors; ``ids=None`` is the content-only path."""
        out = self.content(content)
        if ids is not None:
            emb = self.id_emb(ids)
            out = out + (emb if keep is None else emb * keep[:, None])
        return out

    def user_vec(self, user_feats: torch.Tensor, hist: torch.Tensor,
                 item_vecs: torch.Tensor) -> torch.Tensor:
        """L2-normalised user vectors from features ``[m, u]`` and histories ``[m, N]``.

        ``item_vecs`` are the (normalised) item vectors the history indices point into.
        """
        mask = (hist >= 0).to(item_vecs.dtype)
        pooled = (item_vecs[hist.clamp(min=0)] * mask[..., None]).sum(1)
        pooled = pooled / mask.sum(1, keepdim=True).clamp(min=1.0)
        out = self.user(torch.cat([user_feats, pooled], dim=1)) + pooled
        return F.normalize(out, dim=1)


class TwoTowerModel:
    """A trained two-tower model over a fixed catalog (``n_items`` rows, catalog order).

    Attributes
    ----------
    cfg : the training configuration
    item_content : float32 ``[n_items, c]`` content features of the catalog
    user_feats : float32 ``[n_users, u]`` profile features of the training users (u may be 0)
    histories : int32 ``[n_users, N]`` each training user's most recent items, newest first
    item_counts : int64 ``[n_items]`` training positives per item; 0 = cold (content-only vector)
    loss_history : mean training loss per epoch
    item_spec, user_spec : optional featurisers saved with the export for serving
    """

    def __init__(self, towers: _Towers, cfg: TwoTowerConfig, item_content: np.ndarray,
                 user_feats: np.ndarray, histories: np.ndarray, item_counts: np.ndarray,
                 loss_history: list[float], item_spec: ItemContentSpec | None = None,
                 user_spec: UserFeatureSpec | None = None):
        self.towers = towers.eval()
        self.cfg = cfg
        self.item_content = item_content
        self.user_feats = user_feats
        self.histories = histories
        self.item_counts = item_counts
        self.loss_history = loss_history
        self.item_spec = item_spec
        self.user_spec = user_spec
        self._item_vectors: np.ndarray | None = None

    @torch.no_grad()
    def item_vectors(self) -> np.ndarray:
        """float32 ``[n_items, dim]``, L2-normalised; cold items use the content-only path."""
        if self._item_vectors is None:
            content = torch.from_numpy(self.item_content)
            ids = torch.arange(len(content))
            keep = torch.from_numpy((self.item_counts > 0).astype(np.float32))
            raw = self.towers.item_raw(content, ids, keep)
            self._item_vectors = F.normalize(raw, dim=1).numpy()
        return self._item_vectors

    @torch.no_grad()
    def content_vectors(self, content: np.ndarray) -> np.ndarray:
        """float32 ``[m, dim]`` content-only vectors for (fresh) items ``content [m, c]``."""
        raw = self.towers.item_raw(torch.from_numpy(np.asarray(content, np.float32)), None)
        return F.normalize(raw, dim=1).numpy()

    @torch.no_grad()
    def user_vectors(self, user_feats: np.ndarray | None = None,
                     histories: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[m, dim]`` L2-normalised user vectors.

        Parameters
        ----------
        user_feats : float32 ``[m, u]``; None = the training users' features
        histories : int ``[m, N']`` item indices (``PAD`` = empty), any N'; None = training users'
        """
        feats = self.user_feats if user_feats is None else np.asarray(user_feats, np.float32)
        hist = self.histories if histories is None else np.asarray(histories, np.int32)
        vecs = torch.from_numpy(self.item_vectors())
        return self.towers.user_vec(torch.from_numpy(np.ascontiguousarray(feats)),
                                    torch.from_numpy(hist), vecs).numpy()

    def export(self, bundle_dir: Path) -> dict[str, Path]:
        """Write ``two_tower/item_vectors.npy`` and ``two_tower/user_tower.npz`` under a bundle.

        The npz holds float32 weights named ``user_w1, user_b1, user_w2, user_b2`` (the user MLP,
        ``x @ w + b``), ``content_w1 ... content_b2`` (the item content MLP), and JSON text of the
        featurisers and config; ``tandem.models.user_tower.UserTower`` runs them with numpy alone.
        """
        bundle_dir = Path(bundle_dir)
        vec_path, tower_path = bundle_dir / TT_ITEM_VECTORS, bundle_dir / TT_USER_TOWER
        vec_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(vec_path, self.item_vectors())
        arrays = {}
        for prefix, seq in (("user", self.towers.user), ("content", self.towers.content)):
            for n, layer in zip((1, 2), (seq[0], seq[2]), strict=True):
                arrays[f"{prefix}_w{n}"] = layer.weight.detach().numpy().T.copy()
                arrays[f"{prefix}_b{n}"] = layer.bias.detach().numpy().copy()
        meta = {"item_spec": self.item_spec.to_json() if self.item_spec else "",
                "user_spec": self.user_spec.to_json() if self.user_spec else "",
                "config": json.dumps(asdict(self.cfg))}
        np.savez(tower_path, **arrays, **{k: np.array(v) for k, v in meta.items()})
        return {"item_vectors": vec_path, "user_tower": tower_path}


def _batch_loss(towers: _Towers, content: torch.Tensor, user_feats: torch.Tensor,
                hist: torch.Tensor, target: torch.Tensor, log_q_batch: torch.Tensor,
                n_items: int, cfg: TwoTowerConfig, gen: torch.Generator) -> torch.Tensor:
    """Sampled-softmax loss of one batch (in-batch + uniform negatives, logQ-corrected)."""
    b = len(target)
    sampled = torch.randint(0, n_items, (cfg.n_sampled_negatives,), generator=gen)
    flat = torch.cat([target, sampled, hist.flatten().clamp(min=0)])
    uniq, inv = torch.unique(flat, return_inverse=True)
    keep = (torch.rand(len(uniq), generator=gen) >= cfg.id_dropout).float()
    vecs = F.normalize(towers.item_raw(content[uniq], uniq, keep), dim=1)
    tgt_v = vecs[inv[:b]]
    neg_v = vecs[inv[b:b + len(sampled)]]
    hist_idx = inv[b + len(sampled):].view_as(hist)
    hist_idx = torch.where(hist >= 0, hist_idx, torch.full_like(hist_idx, -1))
    user_v = towers.user_vec(user_feats, hist_idx, vecs)
    logits = torch.cat([user_v @ tgt_v.T, user_v @ neg_v.T], dim=1) / cfg.temperature
    correction = torch.cat([
        log_q_batch[target] + math.log(b),
        torch.full((len(sampled),), math.log(len(sampled) / n_items)),
    ])
    logits = logits - correction[None, :]
    hits = torch.cat([target[None, :] == target[:, None], sampled[None, :] == target[:, None]], 1)
    hits[torch.arange(b), torch.arange(b)] = False
    logits = logits.masked_fill(hits, float("-inf"))
    return F.cross_entropy(logits, torch.arange(b))


def fit_minibatches(opt: torch.optim.Optimizer, n_rows: int, epochs: int, batch_size: int,
                    rng: np.random.Generator, batch_loss, progress: str | None = None,
                    max_steps: int = 0) -> list[float]:
    """Shuffled mini-batch epochs over ``n_rows`` training rows: ``batch_loss(indexes)`` ->
    the batch's loss tensor, one optimiser step per batch (the two-tower and the sequence
    model train this way). Returns the mean loss per epoch (a cut epoch's over its steps);
    ``progress`` names the model in a printed line per epoch.

    ``max_steps > 0`` ends training after that many optimiser steps in all, mid-epoch if need
    be: epochs x rows / batch grows with the platform's rows, the step budget does not, so a
    nightly fit costs the same at 1M and at 50M events (each step still sees a fresh shuffled
    batch; a smaller catalog than the budget trains its full epochs, unchanged)."""
    losses: list[float] = []
    done = 0
    for epoch in range(epochs):
        perm = torch.from_numpy(rng.permutation(n_rows))
        total, steps = 0.0, 0
        for start in range(0, len(perm), batch_size):
            if max_steps and done >= max_steps:
                break
            loss = batch_loss(perm[start:start + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps, done = total + loss.item(), steps + 1, done + 1
        if steps:
            losses.append(total / steps)
            if progress:
                print(f"{progress} epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}")
        if max_steps and done >= max_steps:
            break
    return losses


def train_two_tower(interactions: pd.DataFrame, item_content: np.ndarray,
                    user_feats: np.ndarray | None = None, cfg: TwoTowerConfig | None = None,
                    n_users: int | None = None, item_spec: ItemContentSpec | None = None,
                    user_spec: UserFeatureSpec | None = None,
                    history: pd.DataFrame | None = None) -> TwoTowerModel:
    """Train both towers on positive interactions.

    Parameters
    ----------
    interactions : DataFrame with int columns ``user_idx``, ``item_idx`` (catalog row) and ``ts``
        (any sortable time); one row per positive interaction
    item_content : float32 ``[n_items, c]``, e.g. ``ItemContentSpec.encode`` of the catalog
    user_feats : float32 ``[n_users, u]`` or None (no profile features)
    cfg : hyper-parameters (defaults if None)
    n_users : number of users (default: ``user_feats`` rows, else ``user_idx.max() + 1``)
    item_spec, user_spec : featurisers to save with the export (optional)
    history : DataFrame (``user_idx``, ``item_idx``, ``ts``) of the users' engaged pairs, one
        row per pair at its first engagement, the query histories come from; None: the
        interactions themselves (data where every engagement is a positive)

    Returns
    -------
    TwoTowerModel
    """
    cfg = cfg or TwoTowerConfig()
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.random_state)
    gen = torch.Generator().manual_seed(cfg.random_state)
    rng = np.random.default_rng(cfg.random_state)
    item_content = np.ascontiguousarray(item_content, dtype=np.float32)
    n_items = len(item_content)
    users = interactions["user_idx"].to_numpy(np.int64)
    items = interactions["item_idx"].to_numpy(np.int64)
    ts = interactions["ts"].to_numpy()
    if n_users is None:
        n_users = len(user_feats) if user_feats is not None else int(users.max()) + 1
    if user_feats is None:
        user_feats = np.zeros((n_users, 0), dtype=np.float32)
    user_feats = np.ascontiguousarray(user_feats, dtype=np.float32)
    hist = interactions if history is None else history
    h_users, h_items = hist["user_idx"].to_numpy(np.int64), hist["item_idx"].to_numpy(np.int64)
    h_ts = hist["ts"].to_numpy(np.int64)
    before = QH.histories_before(h_users, h_items, h_ts, users, items, ts, cfg.history_len)
    last = QH.query_items(h_users, h_items, h_ts, n_users, cfg.history_len)
    counts = np.bincount(items, minlength=n_items)
    log_q = torch.from_numpy(np.log(np.maximum(counts, 1) / len(items)).astype(np.float32))

    towers = _Towers(n_items, item_content.shape[1], user_feats.shape[1], cfg)
    opt = torch.optim.Adam(towers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    content_t = torch.from_numpy(item_content)
    feats_t, before_t = torch.from_numpy(user_feats), torch.from_numpy(before)
    users_t, items_t = torch.from_numpy(users), torch.from_numpy(items)
    towers.train()
    losses = fit_minibatches(
        opt, len(items), cfg.epochs, cfg.batch_size, rng,
        lambda idx: _batch_loss(towers, content_t, feats_t[users_t[idx]], before_t[idx],
                                items_t[idx], log_q, n_items, cfg, gen),
        "two-tower" if cfg.show_progress else None, cfg.max_steps)
    return TwoTowerModel(towers, cfg, item_content, user_feats, last, counts, losses,
                         item_spec, user_spec)
