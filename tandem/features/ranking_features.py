"""The ranker's per-candidate feature matrix: one function for training and serving.

A candidate is a (user, item) pair that retrieval returned. Its row concatenates, in
:data:`FEATURE_NAMES` order:

1. retrieval: each source's score and 1-based rank (NaN where that source did not return the
   item; LightGBM treats NaN as missing), and how many sources returned it;
2. entity features from :mod:`tandem.features.entity` (user profile/activity, item
   content/popularity/ CTR/age, current session), exactly as the feature store's rows transform
   them;
3. crosses and context: user x item genre affinity, request hour (UTC) and device code;
4. sequence: ``sequence_affinity``, the session sequence model's score ``h_user . E[item]`` of
   EVERY candidate (``sequence_score`` exists only for the items the sequence source
   retrieved), from the same query the source searches with;
5. recency: max / mean / newest cosine between the candidate and the user's last
   :data:`N_RECENT` items in ALS item-factor space, and max / mean co-occurrence with them
   normalised by popularity (cosine of the binary item columns). The quality probe found these
   to carry most of the signal under a temporal split.

Training (``tandem.evaluation.protocol``, ``jobs/train_ranker.py``) and serving call
:func:`build_features` with the same arrays; nothing here loops over candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tandem.features import entity as F

SOURCES: tuple[str, ...] = ("als", "two_tower", "popularity", "sequence", "content")
N_RECENT = 5
PAD = -1  # empty slot in a recent-items row
_FEW_COLUMNS = 256  # ItemSpace.cooc_values slices columns up to this many distinct ones
_RECENCY_CHUNK = 65_536  # rows whose recent items' vectors recency_features gathers at once
DEVICES: tuple[str, ...] = ("web", "ios", "android", "tv")  # code 1..4; other 5; missing 0

SOURCE_FEATURES: tuple[str, ...] = (
    *(f"{src}_{kind}" for src in SOURCES for kind in ("score", "rank")), "n_sources")
CONTEXT_FEATURES: tuple[str, ...] = ("genre_affinity_cross", "ctx_hour", "ctx_device_code")
SEQUENCE_FEATURES: tuple[str, ...] = ("sequence_affinity",)
RECENCY_FEATURES: tuple[str, ...] = (
    "recent_cos_max", "recent_cos_mean", "recent_cos_newest", "recent_cooc_max",
    "recent_cooc_mean")
FEATURE_NAMES: tuple[str, ...] = (
    *SOURCE_FEATURES, *F.USER_FEATURES, *F.ITEM_FEATURES, *F.SESSION_FEATURES,
    *CONTEXT_FEATURES, *SEQUENCE_FEATURES, *RECENCY_FEATURES)


@dataclass
class ItemSpace:
    """Item-item artifacts the recency features need (shipped with the ranker).

    Attributes
    ----------
    unit_vectors : float32 [n_items, f], L2-normalised ALS item factors (zero rows allowed)
    cooc : float32 CSR [n_items, n_items], co-occurrence / sqrt(pop_i * pop_j), zero diagonal
    by_column : ``cooc`` in canonical CSC form when the caller has it (serving maps it from a
        file, ``serving.engine``); built on first use otherwise
    """

    unit_vectors: np.ndarray
    cooc: sp.csr_matrix
    by_column: sp.csc_matrix | None = field(default=None, repr=False)

    def cooc_columns(self) -> sp.csc_matrix:
        """``cooc`` in canonical CSC form (sorted rows, no duplicates), built once."""
        if self.by_column is None:
            csc = sp.csc_matrix(self.cooc)
            csc.sum_duplicates()
            self.by_column = csc
        return self.by_column

    def cooc_values(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``cooc[rows, cols]`` as ``[m]`` values of ``cooc``'s dtype (0 where none is stored).

        A request asks for a few columns (the user's last items) at many rows: those columns
        are sliced from :meth:`cooc_columns` and every (row, column) pair is found by one
        ``searchsorted`` over their (column, row) keys. Lookups of many distinct columns
        (training batches) use scipy's element indexing. Both return the stored values
        themselves, so the result does not depend on the branch.
        """
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        wanted, col_of = np.unique(cols, return_inverse=True)
        if len(wanted) > _FEW_COLUMNS:
            return np.asarray(self.cooc[rows, cols]).ravel()
        csc = self.cooc_columns()
        start = csc.indptr[wanted].astype(np.int64)
        length = csc.indptr[wanted + 1] - start
        # stored entries of the wanted columns, column after column (rows ascending in each)
        first = np.cumsum(length) - length
        at = np.arange(length.sum()) + np.repeat(start - first, length)
        n_rows = np.int64(csc.shape[0])
        keys = np.repeat(np.arange(len(wanted), dtype=np.int64), length) * n_rows \
            + csc.indices[at]  # ascending
        query = col_of.astype(np.int64) * n_rows + rows
        out = np.zeros(len(query), dtype=csc.dtype)
        if len(keys):
            pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
            hit = keys[pos] == query
            out[hit] = csc.data[at[pos[hit]]]
        return out


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors, dtype=np.float32),
                     where=norms > 0).astype(np.float32)


def cooccurrence(interactions: sp.csr_matrix) -> sp.csr_matrix:
    """Popularity-normalised item co-occurrence from a users x items matrix (binarised).

    cooc[i, j] = |users with i and j| / sqrt(|users with i| * |users with j|), in [0, 1];
    the diagonal is 0 so an item is not "similar" to itself.
    """
    binary = (interactions > 0).astype(np.float32).tocsc()
    counts = binary.T @ binary
    pop = np.asarray(binary.sum(axis=0)).ravel()
    inv = sp.diags(np.where(pop > 0, 1.0 / np.sqrt(np.maximum(pop, 1.0)), 0.0).astype(np.float32))
    cooc = (inv @ counts @ inv).tocsr()
    cooc.setdiag(0.0)
    cooc.eliminate_zeros()
    return cooc.astype(np.float32)


def recency_features(items: np.ndarray, user_rows: np.ndarray, recent: np.ndarray,
                     space: ItemSpace) -> np.ndarray:
    """[n, len(RECENCY_FEATURES)] float32 for candidate ``items`` [n] of users ``user_rows`` [n].

    ``recent`` is [n_users, R] item indices, newest first, ``PAD`` for empty slots. A row
    without recent items gets NaN (missing) everywhere. With one user (a serving request) the
    cosines take one [n, f] x [R, f] product instead of gathering R vectors per candidate; the
    einsum sums over ``f`` in the same order either way, so both give identical bits.
    """
    n, r = len(items), recent.shape[1]
    out = np.full((n, len(RECENCY_FEATURES)), np.nan, dtype=np.float32)
    if len(recent) == 1:  # one request: its R vectors, broadcast over the candidates
        if not (recent[0] >= 0).any():  # no recent items: every row is missing
            return out
        row = np.where(recent[0] >= 0, recent[0], 0)
        cos = np.einsum("nf,rf->nr", space.unit_vectors[items], space.unit_vectors[row])
        valid = np.broadcast_to(recent[0] >= 0, (n, r))
        safe = np.broadcast_to(row, (n, r))
        has = slice(None)  # every row has the request's recent items: no row gathers
    else:
        per_candidate = recent[user_rows]
        valid = per_candidate >= 0
        safe = np.where(valid, per_candidate, 0)
        # the [rows, R, f] gather a chunk at a time: all of a night's training rows at once is
        # ~6 GB at ~5M rows x 5 x 64 x 4 B (10m rung: train_ranker passed 11 GB while in it);
        # each row's cosines are computed exactly as before
        cos = np.empty((n, r), dtype=space.unit_vectors.dtype)
        for lo in range(0, n, _RECENCY_CHUNK):
            part = slice(lo, lo + _RECENCY_CHUNK)
            cos[part] = np.einsum("nf,nrf->nr", space.unit_vectors[items[part]],
                                  space.unit_vectors[safe[part]])
        has = valid.any(axis=1)
    cooc = space.cooc_values(np.repeat(items, r), safe.ravel()).reshape(n, r)
    count = np.maximum(valid.sum(axis=1), 1)
    out[has, 0] = np.where(valid, cos, -np.inf).max(axis=1)[has]
    out[has, 1] = (np.where(valid, cos, 0.0).sum(axis=1) / count)[has]
    out[has, 2] = np.where(valid[:, 0], cos[:, 0], np.nan)[has]
    out[has, 3] = np.where(valid, cooc, 0.0).max(axis=1)[has]
    out[has, 4] = (np.where(valid, cooc, 0.0).sum(axis=1) / count)[has]
    return out


def sequence_affinity(items: np.ndarray, user_rows: np.ndarray,
                      sequence: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """float32 [n]: ``queries[user_rows] . item_vectors[items]`` for ``sequence`` = (queries
    [n_users, d] of ``tandem.models.sequence.SequenceEncoder.encode_batch``, its item vectors
    [n_items, d]); NaN without a model, for a user without history (zero query) and for items
    newer than the model (no vector)."""
    n = len(items)
    if sequence is None or n == 0:
        return np.full(n, np.nan, dtype=np.float32)
    queries, vectors = sequence
    known = items < len(vectors)
    rows = np.where(known, items, 0)
    if len(queries) == 1:  # one request: one [n, d] x [d] product
        out = vectors[rows] @ queries[0]
        has = np.broadcast_to(np.any(queries[0] != 0), (n,))
    else:
        out = np.einsum("nd,nd->n", vectors[rows], queries[user_rows])
        has = np.any(queries != 0, axis=1)[user_rows]
    return np.where(known & has, out, np.nan).astype(np.float32)


def columns_of(names: Sequence[str]) -> np.ndarray | None:
    """Positions in :data:`FEATURE_NAMES` of a ranker's input columns (a bundle's
    ``features.json`` names), so an older bundle's ranker gets exactly the columns it was
    trained on; None when ``names`` is :data:`FEATURE_NAMES` itself (no copy needed)."""
    names = tuple(names)
    if names == FEATURE_NAMES:
        return None
    unknown = sorted(set(names) - set(FEATURE_NAMES))
    if unknown:
        raise ValueError(f"the ranker expects features ranking_features does not build: {unknown}")
    return np.array([FEATURE_NAMES.index(n) for n in names], dtype=np.int64)


def device_codes(devices: np.ndarray) -> np.ndarray:
    """1-based code in :data:`DEVICES`; 0 when missing/empty; ``len(DEVICES) + 1`` otherwise."""
    values = pd.Series(devices, dtype=object).fillna("").to_numpy(object)
    codes = pd.Categorical(values, categories=list(DEVICES)).codes.astype(np.float32) + 1.0
    return np.where(codes > 0, codes, np.where(values == "", 0.0, len(DEVICES) + 1.0))


def build_features(user_rows: np.ndarray, items: np.ndarray, sources: dict[str, np.ndarray],
                   user_matrix: np.ndarray, item_matrix: np.ndarray,
                   session_matrix: np.ndarray, hour: np.ndarray, device: np.ndarray,
                   recent: np.ndarray, space: ItemSpace,
                   sequence: tuple[np.ndarray, np.ndarray] | None = None,
                   sequence_rows: np.ndarray | None = None) -> np.ndarray:
    """The ranker's input [n, len(FEATURE_NAMES)] float32 for n candidates.

    Parameters
    ----------
    user_rows : int [n], each candidate's row in the per-user arrays below
    items : int [n], each candidate's item index (catalog order, rows of ``space``)
    sources : ``{"<source>_score": [n], "<source>_rank": [n]}`` float arrays, NaN where the
        source did not return the candidate; absent keys are all-NaN
    user_matrix : [n_users, len(F.USER_FEATURES)] from ``features.user_matrix`` at request time
    item_matrix : [n, len(F.ITEM_FEATURES)] from ``features.item_matrix``, one row per
        candidate (item features are relative to the candidate's request time)
    session_matrix : [n_users, len(F.SESSION_FEATURES)] from ``features.session_matrix``
    hour : [n_users] request hour 0-23 (UTC); device : [n_users] ``device_codes`` values
    recent : [n_users, R] the user's last items (indices), newest first, ``PAD``-filled
    space : ALS unit vectors and co-occurrence, see :class:`ItemSpace`
    sequence : (queries [n_users, d], item vectors [n_items, d]) of the sequence model, the
        queries its retrieval source searches with; None (no model) gives NaN
        ``sequence_affinity``
    sequence_rows : int [n], each candidate's row in ``sequence``'s queries (default
        ``user_rows``; the feature store's path has one user row per candidate but one query
        per request)
    """
    n = len(items)
    # Each block is cast to float32 as it is written into one matrix (what one cast of their
    # float64 concatenation gave, bit for bit, after two full-size copies); column-major, so
    # each column is one contiguous write (the ranker copies it to its row-major float64 input)
    out = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32, order="F")
    for j, name in enumerate(SOURCE_FEATURES[:-1]):
        out[:, j] = sources.get(name, np.nan)
    n_src = len(SOURCE_FEATURES)
    out[:, n_src - 1] = (~np.isnan(out[:, : n_src - 1: 2])).sum(axis=1, dtype=np.float32)
    one_user = len(user_matrix) == 1  # a request: its rows broadcast, not gathered per item
    users = user_matrix[0] if one_user else user_matrix[user_rows]
    at = _BLOCKS
    out[:, at["user"]] = users
    out[:, at["item"]] = item_matrix
    out[:, at["session"]] = session_matrix[0] if one_user else session_matrix[user_rows]
    out[:, at["cross"]] = F.genre_affinity_cross(users[..., F.USER_AFFINITY_SLICE],
                                                 item_matrix[:, F.ITEM_GENRE_SLICE])
    out[:, at["hour"]] = hour[0] if one_user else hour[user_rows]
    out[:, at["device"]] = device[0] if one_user else device[user_rows]
    out[:, at["sequence"]] = sequence_affinity(
        items, user_rows if sequence_rows is None else sequence_rows, sequence)
    out[:, at["recency"]] = recency_features(items, user_rows, recent, space)
    return out


def _block_columns() -> dict[str, slice | int]:
    """Where each block of :func:`build_features` sits in :data:`FEATURE_NAMES`."""
    sizes = {"sources": len(SOURCE_FEATURES), "user": len(F.USER_FEATURES),
             "item": len(F.ITEM_FEATURES), "session": len(F.SESSION_FEATURES), "cross": 1,
             "hour": 1, "device": 1, "sequence": len(SEQUENCE_FEATURES),
             "recency": len(RECENCY_FEATURES)}
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = start if size == 1 else slice(start, start + size)
        start += size
    assert start == len(FEATURE_NAMES)
    return out


_BLOCKS = _block_columns()
