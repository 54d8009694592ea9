"""Implicit-feedback ALS (benfred/implicit) on a user x item confidence matrix.

Confidence comes from events: each event type carries a weight (``ALS_CONFIG["event_weights"]``),
a play adds up to ``dwell_weight`` more in proportion to its dwell time, and a (user, item) pair's
confidence is the capped sum over its events. implicit then uses ``1 + alpha * confidence`` as
the weight of a positive cell (Hu, Koren & Volinsky, ICDM 2008).

The same :func:`event_confidence` runs inside the Spark job (``mapInPandas``) and in the offline
evaluation, so both build identical matrices. Rows are users and columns items, each in the
dense index order the caller chose (catalog order for items).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from tandem import schema as S

ALS_CONFIG: dict[str, Any] = {
    # weight of one event by type; impressions and dislikes add nothing
    "event_weights": {
        S.IMPRESSION: 0.0, S.CLICK: 1.0, S.PLAY: 1.0, S.COMPLETE: 2.0, S.LIKE: 3.0,
        S.DISLIKE: 0.0, S.RATING: 1.0, S.SHARE: 3.0, S.ADD_TO_LIST: 2.0,
    },
    "dwell_weight": 1.0,  # a play's extra weight at full dwell
    "dwell_full_ms": 600_000,  # dwell that earns the whole dwell_weight (10 minutes)
    "max_confidence": 20.0,  # cap of a pair's summed weight
    # model (quality probe on ml-100k: 32 factors, reg 0.5, alpha 2 beat 64/128 factors)
    "factors": 32,
    "regularization": 0.5,
    "alpha": 2.0,
    "iterations": 15,
    "random_state": 42,
}


def event_confidence(events: pd.DataFrame, cfg: dict[str, Any] = ALS_CONFIG) -> np.ndarray:
    """Per-event confidence weight, shape (n_events,), float32, >= 0.

    ``events`` needs ``event_type`` and ``dwell_ms`` (null when absent). Unknown types weigh 0.
    """
    weights = events[S.EVENT_TYPE].map(cfg["event_weights"]).fillna(0.0).to_numpy(np.float64)
    dwell = pd.to_numeric(events[S.DWELL_MS], errors="coerce").fillna(0.0).to_numpy(np.float64)
    is_play = (events[S.EVENT_TYPE] == S.PLAY).to_numpy()
    weights += is_play * cfg["dwell_weight"] * np.clip(dwell / cfg["dwell_full_ms"], 0.0, 1.0)
    return weights.astype(np.float32)


def pair_confidence(events: pd.DataFrame, cfg: dict[str, Any] = ALS_CONFIG) -> pd.DataFrame:
    """(user_id, item_id, confidence) with the capped per-pair sum; pairs summing to 0 dropped."""
    frame = events[[S.USER_ID, S.ITEM_ID]].assign(confidence=event_confidence(events, cfg))
    pairs = frame.groupby([S.USER_ID, S.ITEM_ID], as_index=False, sort=False)["confidence"].sum()
    pairs["confidence"] = pairs["confidence"].clip(upper=cfg["max_confidence"])
    return pairs[pairs["confidence"] > 0].reset_index(drop=True)


def confidence_matrix(pairs: pd.DataFrame, user_ids: pd.Index, item_ids: pd.Index) -> sp.csr_matrix:
    """CSR users x items (float32) from ``pair_confidence`` rows.

    ``user_ids``/``item_ids`` fix the dense row/column order; pairs outside them are dropped.
    """
    rows = user_ids.get_indexer(pairs[S.USER_ID])
    cols = item_ids.get_indexer(pairs[S.ITEM_ID])
    keep = (rows >= 0) & (cols >= 0)
    values = pairs["confidence"].to_numpy(np.float32)[keep]
    matrix = sp.csr_matrix((values, (rows[keep], cols[keep])),
                           shape=(len(user_ids), len(item_ids)), dtype=np.float32)
    matrix.sum_duplicates()
    return matrix


@dataclass
class AlsFactors:
    """A fitted model's factors with the ids of their rows.

    Attributes
    ----------
    user_ids, item_ids : pd.Index of str
        Row order of ``user_factors`` (n_users, f) and ``item_factors`` (n_items, f), float32.
    """

    user_ids: pd.Index
    item_ids: pd.Index
    user_factors: np.ndarray
    item_factors: np.ndarray

    def scores(self, user_rows: np.ndarray) -> np.ndarray:
        """Dot-product scores, shape (len(user_rows), n_items)."""
        return self.user_factors[user_rows] @ self.item_factors.T

    def save(self, folder: Path) -> None:
        """Write ``user_factors.npy``, ``item_factors.npy`` and ``ids.json`` (overwrites)."""
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "user_factors.npy", self.user_factors)
        np.save(folder / "item_factors.npy", self.item_factors)
        (folder / "ids.json").write_text(json.dumps(
            {"user_ids": list(self.user_ids), "item_ids": list(self.item_ids)}))

    @classmethod
    def load(cls, folder: Path) -> AlsFactors:
        ids = json.loads((folder / "ids.json").read_text())
        return cls(pd.Index(ids["user_ids"]), pd.Index(ids["item_ids"]),
                   np.load(folder / "user_factors.npy"), np.load(folder / "item_factors.npy"))


def fit_als(matrix: sp.csr_matrix, user_ids: pd.Index, item_ids: pd.Index,
            cfg: dict[str, Any] = ALS_CONFIG, show_progress: bool = False) -> AlsFactors:
    """Fit CPU implicit ALS on a users x items confidence CSR; returns float32 factors.

    Deterministic for a fixed ``cfg["random_state"]`` and thread count.
    """
    model = AlternatingLeastSquares(
        factors=cfg["factors"], regularization=cfg["regularization"], alpha=cfg["alpha"],
        iterations=cfg["iterations"], random_state=cfg["random_state"])
    model.fit(matrix.tocsr().astype(np.float32), show_progress=show_progress)
    return AlsFactors(user_ids, item_ids, np.asarray(model.user_factors, np.float32),
                      np.asarray(model.item_factors, np.float32))


def fold_in(item_factors: np.ndarray, user_items: sp.csr_matrix,
            cfg: dict[str, Any] = ALS_CONFIG) -> np.ndarray:
    """User factors [m, f] (float32) solved against fixed ``item_factors`` from each row of
    ``user_items`` ([m, n_items] confidences; zeros ignored) -- the ALS user step, exactly as
    fitting would take it, for users whose rows differ from the ones the model was fit on.

    Rows without confidence get zero vectors (they score every item 0).
    """
    rows = sp.csr_matrix(user_items, dtype=np.float32, copy=True)
    rows.eliminate_zeros()
    model = AlternatingLeastSquares(factors=item_factors.shape[1],
                                    regularization=cfg["regularization"], alpha=cfg["alpha"],
                                    random_state=cfg["random_state"])
    model.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
    return np.asarray(model.recalculate_user(np.arange(rows.shape[0]), rows), np.float32)


def gram(item_factors: np.ndarray) -> np.ndarray:
    """``Y^T Y`` [f, f] float64 of the item factors: the shared part of every user's ALS system,
    computed once per model (at serving load) and reused by :func:`fold_in_one`. Summed in
    float64 over blocks of rows, so 1M items never hold a float64 copy of the factors."""
    f = item_factors.shape[1]
    out = np.zeros((f, f), dtype=np.float64)
    for start in range(0, len(item_factors), 65_536):
        y = np.asarray(item_factors[start:start + 65_536], dtype=np.float64)
        out += y.T @ y
    return out


def fold_in_one(item_factors: np.ndarray, yty: np.ndarray, rows: np.ndarray,
                confidence: np.ndarray, cfg: dict[str, Any] = ALS_CONFIG,
                prior: np.ndarray | None = None) -> np.ndarray:
    """One user's factors [f] (float32) by the closed-form ALS user step, the math of
    :func:`fold_in` for one row, in numpy so serving can run it per request (~30 us at f=32).

    ``x = (Y^T C Y + reg I)^-1 Y^T C p`` with implicit's confidences ``C = alpha * confidence``
    on the user's items ``rows`` (p = 1 there) and ``C = 1, p = 0`` elsewhere, i.e.
    ``A = YtY + reg I + sum_i (C_i - 1) y_i y_i^T`` and ``b = sum_i C_i y_i``
    (``tests/test_als.py`` pins it to :func:`fold_in`, i.e. to implicit's solver).

    ``prior``: the user's nightly vector ``x0``, standing for the history it was solved from.
    That history's system ``A0 x0 = b0`` is not stored (f x f per user); it is taken as
    ``A0 = YtY + reg I`` (its items' extra confidence terms dropped), so ``b0 = A0 x0`` and the
    new items add to both sides. Dropping those terms weighs the stored history less than a
    full refit would: recent items move the vector further, which is what a fold-in between
    nightly runs is for; the nightly fit then weighs everything exactly again.
    """
    f = item_factors.shape[1]
    a = yty + cfg["regularization"] * np.eye(f)
    b = a @ np.asarray(prior, dtype=np.float64) if prior is not None else np.zeros(f)
    rows = np.asarray(rows, dtype=np.int64)
    c = cfg["alpha"] * np.asarray(confidence, dtype=np.float64)
    keep = c > 0
    if keep.any():
        ys, c = np.asarray(item_factors[rows[keep]], dtype=np.float64), c[keep]
        a = a + (ys.T * (c - 1.0)) @ ys
        b = b + ys.T @ c
    elif prior is None:
        return np.zeros(f, dtype=np.float32)
    return np.linalg.solve(a, b).astype(np.float32)


def session_confidence(session: Mapping[str, Any] | None, n_items: int) -> float:
    """ALS confidence of one recent item: the session's engagements weighted as in the nightly
    matrix (``ALS_CONFIG["event_weights"]``), spread over its ``n_items`` recent items, between
    a click's weight and the nightly cap. A burst of a click and a like per item gives 4."""
    cfg = ALS_CONFIG
    floor = cfg["event_weights"][S.CLICK]
    if not session or n_items == 0:
        return floor
    total = sum(float(session.get(S.SESSION_COUNT_PREFIX + t) or 0) * w
                for t, w in cfg["event_weights"].items() if w > 0)
    return float(np.clip(total / n_items, floor, cfg["max_confidence"]))


def session_query(item_factors: np.ndarray, yty: np.ndarray, prior: np.ndarray | None,
                  history: np.ndarray, session: Mapping[str, Any] | None,
                  cfg: dict[str, Any] = ALS_CONFIG) -> np.ndarray | None:
    """The ALS query serving searches with (``serving.session_retrieval``), and the nightly
    index build tunes on: the user's nightly vector ``prior`` (None: not in the build) refolded
    with the session's recent items ``history`` (catalog rows, newest first), each weighted
    :func:`session_confidence` of the session row. None when there is nothing to fold."""
    if len(history) == 0:
        return prior
    conf = np.full(len(history), session_confidence(session, len(history)), np.float32)
    return fold_in_one(item_factors, yty, history, conf, cfg, prior=prior)


def serving_queries(item_factors: np.ndarray, user_factors: np.ndarray,
                    sessions: list[np.ndarray], rng: np.random.Generator,
                    cfg: dict[str, Any] = ALS_CONFIG) -> np.ndarray:
    """ALS queries [m, f] (float32) to tune the ALS index on when the real mix is unknown
    (the nightly build): :func:`session_query`'s three cases in equal shares, shuffled -- a
    user's nightly vector (no session), that vector refolded with the user's ``sessions[i]``
    (catalog rows, at least one each; one click per item), and the session alone (a user not
    in the build: norm ~20x smaller, another direction). ``cfg``: the fitted configuration."""
    users = np.asarray(user_factors, dtype=np.float32)
    out = users.copy()
    yty = gram(item_factors)
    third = len(users) // 3
    for i in range(third, len(users)):
        out[i] = session_query(item_factors, yty, users[i] if i < 2 * third else None,
                               np.asarray(sessions[i], dtype=np.int64), None, cfg)
    return out[rng.permutation(len(out))]


def top_k_items(scores: np.ndarray, k: int, exclude: sp.csr_matrix | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns per row, best first: (indices (n, k) int64, scores (n, k) float32).

    ``exclude`` (same shape as ``scores``, e.g. the training interactions) masks cells to -inf;
    masked cells may still fill a row that has fewer than ``k`` allowed items.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    if exclude is not None:
        rows, cols = exclude.nonzero()
        scores[rows, cols] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)
