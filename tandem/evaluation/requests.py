"""Ranking requests of the offline protocol: who is asked and when, and the ranker's matrix.

A request is a user asked at one time (the first held-out event, or a labelled row in the
nightly evaluation). Its features are the point-in-time rows of
:mod:`tandem.evaluation.point_in_time` through
:func:`tandem.features.ranking_features.build_features`, the function serving calls, so offline
ranking sees what serving would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tandem import schema as S
from tandem.evaluation.point_in_time import item_rows_at, session_rows, user_rows
from tandem.evaluation.protocol import Catalog
from tandem.evaluation.sources import Fitted
from tandem.features import entity as F
from tandem.features import ranking_features as RF


@dataclass
class Requests:
    """Who is ranked and when: one request per user row."""

    user_rows: np.ndarray  # int [m]
    now_ms: np.ndarray  # int64 [m], the request time (the user's first held-out event)
    device: np.ndarray  # object [m], ctx_device of that event
    # int [m, L] the sequence model's query items per request (newest first), when they are
    # not ``Fitted.sequence_recent``'s rows (the nightly path's request-local histories)
    sequence_recent: np.ndarray | None = None


def requests_from(heldout: pd.DataFrame, catalog: Catalog, users: pd.Index) -> Requests:
    """One request per user in ``users``, at the time of their first held-out event."""
    first = heldout.sort_values(S.TS, kind="stable").drop_duplicates(S.USER_ID)
    first = first.set_index(S.USER_ID).reindex(users)
    return Requests(catalog.user_ids.get_indexer(users), first[S.TS].to_numpy(np.int64),
                    first[S.CTX_DEVICE].to_numpy(object))


def feature_matrix(fitted: Fitted, catalog: Catalog, req: Requests, cands: pd.DataFrame,
                   cfg: dict[str, Any]) -> np.ndarray:
    """:func:`ranking_features.build_features` for ``cands`` of the requests' users."""
    local = pd.Index(req.user_rows).get_indexer(cands["user_row"])
    urows = user_rows(fitted.history, catalog, req.user_rows, req.now_ms, cfg["play_dwell_ms"])
    user_mat = F.user_matrix(urows, req.now_ms)
    items = cands["item"].to_numpy()
    if fitted.item_events is None:
        raise ValueError("no item events: these item features come from the feature store")
    irows = item_rows_at(fitted.item_events, catalog, items, req.now_ms[local])
    item_mat = F.item_matrix(irows, req.now_ms[local])
    sess, recent = session_rows(fitted.history, catalog, req.user_rows, RF.N_RECENT)
    session_mat = F.session_matrix(sess, req.now_ms)
    hour = ((req.now_ms // 3_600_000) % 24).astype(np.float32)
    sources = {c: cands[c].to_numpy(np.float32) for c in cands.columns
               if c.endswith(("_score", "_rank"))}
    return RF.build_features(local, items, sources, user_mat, item_mat, session_mat, hour,
                             RF.device_codes(req.device), recent, fitted.space,
                             sequence_inputs(fitted, req))


def store_feature_matrix(store, fitted: Fitted, catalog: Catalog, req: Requests,
                         cands: pd.DataFrame) -> np.ndarray:
    """The same matrix with the entity features from Feast's point-in-time join (one entity row
    per candidate, at its request's time): what the nightly ranker trains on, so the nightly
    evaluation scores it with the features it learned from (``feature_source="feast"``)."""
    from tandem.features.feature_store import training_frame, training_matrices

    local = pd.Index(req.user_rows).get_indexer(cands["user_row"])
    entity_df = pd.DataFrame({
        S.USER_ID: catalog.user_ids[cands["user_row"].to_numpy()],
        S.ITEM_ID: catalog.item_ids[cands["item"].to_numpy()],
        S.EVENT_TIMESTAMP: pd.to_datetime(req.now_ms[local], unit="ms", utc=True)})
    users, items, session = training_matrices(training_frame(store, entity_df))
    _, recent = session_rows(fitted.history, catalog, req.user_rows, RF.N_RECENT)
    sources = {c: cands[c].to_numpy(np.float32) for c in cands.columns
               if c.endswith(("_score", "_rank"))}
    hour = ((req.now_ms[local] // 3_600_000) % 24).astype(np.float32)
    rows = np.arange(len(cands))
    return RF.build_features(rows, cands["item"].to_numpy(), sources, users, items, session,
                             hour, RF.device_codes(req.device[local]), recent[local],
                             fitted.space, sequence_inputs(fitted, req), sequence_rows=local)


def sequence_inputs(fitted: Fitted, req: Requests) -> tuple[np.ndarray, np.ndarray] | None:
    """(queries [m, d] of the requests' users, item vectors) for ``sequence_affinity``: the
    query the sequence source retrieves with (:func:`source_scores`); None without the model."""
    if fitted.sequence is None:
        return None
    recent = (req.sequence_recent if req.sequence_recent is not None
              else fitted.sequence_recent[req.user_rows])
    return fitted.sequence.encode_batch(recent), fitted.sequence.item_vectors
