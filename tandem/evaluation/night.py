"""The night's bundle as retrieval sources, for the ranker's training and the nightly evaluation.

Each model is fitted once a night (``jobs/train_als.py``, ``jobs/train_two_tower.py``); the ranker
and the evaluation score candidates with THOSE models, through the night's ANN indexes, instead
of refitting their own. They ask the question serving answers: at the request time ``cut`` (the
label cut of the window), what does each source retrieve for a user, given what the user did
before ``cut``? Labels are the user's pairs first engaged positively in ``[cut, end)``.

- users: those with a label pair, split once by a seeded draw into a ranker half and an
  evaluation half (the evaluation never scores users the ranker learned from), each capped at
  ``max_users`` (a seeded sample) -- the cost is the cap, not the platform's user count;
- ALS: the night's item factors; each request user's vector is FOLDED IN from their pre-cut
  pairs only (``tandem.models.als.fold_in``), so the user side never sees the labels;
- two-tower: the exported user tower (numpy) over the user's profile and query history at the
  cut (``tandem.features.query_history``: the last distinct engaged items, as serving's session row
  holds them; the pairs' ``engaged_ts``); item vectors and the index are the night's;
- sequence (when the bundle has it): the session sequence model's query from the same history
  (``tandem.models.sequence``), searched in its own index;
- popularity: distinct users per item before ``cut``;
- content (``content_k`` > 0): serving's genre-profile source (``tandem.policy.retrieval``) on the
  user's pre-cut positives' genres and last engaged items, one call per request user;
- every source retrieves through its ANN index (``tandem.models.ann``) ``k + (most seen items)``
  deep and drops the user's pre-cut items, so no users x items score matrix is ever built.

The item side (factors, vectors, co-occurrence) was fit on the whole window, labels included:
the price of fitting once, documented rather than hidden. The evaluation therefore measures the
stack serving will run, on held-out users and a held-out period of their history. Both the
ranker and the evaluation then ask each request at the user's first labelled row after the cut
(:func:`ask_at_labels`: its time and device, what serving's ranker sees), history still cut at
``cut``.

Memory model at 5M users x 1M items x 50M events (~30M pairs): the table's pair columns in numpy,
30M x 44 B = 1.3 GB (checked against ``TANDEM_DRIVER_BUDGET_MB`` by ``tandem.data.lake``); per
request user, the index answer (k + seen) x 12 B and the history row; with the default cap of 20k
users, ~0.1 GB. The item factors / vectors 1M x 32..64 x 4 B and the indexes ~0.5 GB. The request
users' events in pandas, 20k x ~100 x 400 B = 0.8 GB; for in-process item features, every
pre-cut event's item columns in numpy (``tandem.data.lake.read_item_events``), 50M x 56 B = 2.8 GB
(the window in pandas would be 20 GB); both checked against the budget before the read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import scipy.sparse as sp

from tandem import schema as S
from tandem.config import within_driver_budget
from tandem.data import lake as L
from tandem.features import query_history as QH
from tandem.features import ranking_features as RF
from tandem.models import als as A
from tandem.models import bundle as B
from tandem.models.ann import AnnIndex

RANKER, EVALUATION = "ranker", "evaluation"
# the label cut: the last ``label_days`` of the window, else its last ``label_fraction``
CUT_CONFIG: dict[str, Any] = {"label_days": None, "label_fraction": 0.2}
NIGHT_CONFIG: dict[str, Any] = {
    "max_users": 20_000,  # request users sampled per role (ranker, evaluation)
    "eval_user_share": 0.5,  # label users drawn into the evaluation half
    "history_len": QH.QUERY_LEN,  # query history at the cut: user tower and sequence model
    "max_seen": 1_000,  # pre-cut items per user excluded from retrieval (the most recent)
    "random_state": 7,
}


def label_cut(start: datetime, end: datetime, cfg: dict[str, Any]) -> datetime:
    """The request time: labels come from [cut, end), history from [start, cut)."""
    window = (timedelta(days=cfg["label_days"]) if cfg.get("label_days")
              else (end - start) * cfg["label_fraction"])
    return end - window


@dataclass
class Requests:
    """The sampled request users of one role around the cut.

    Attributes
    ----------
    user_rows : int64 [m], bundle user rows, ascending
    history : float32 CSR [m, n_items], ALS weight of each user's pre-cut pairs (0 kept as
        stored zeros: an impression-only pair is seen but carries no confidence)
    labels : DataFrame (user_row, item) of the pairs first engaged positively after the cut
    popularity : float64 [n_items], distinct users per item before the cut (all users)
    n_history_pairs, n_label_pairs : pair counts (all users) on both sides of the cut
    """

    user_rows: np.ndarray
    history: sp.csr_matrix
    labels: pd.DataFrame
    popularity: np.ndarray
    n_history_pairs: int
    n_label_pairs: int


def requests(table: L.TrainingTable, cut_ms: int, role: str, cfg: dict[str, Any] | None = None
             ) -> Requests:
    """The ``role``'s (:data:`RANKER` or :data:`EVALUATION`) request users and their pairs."""
    cfg = {**NIGHT_CONFIG, **(cfg or {})}
    n_users, n_items = table.shape()
    cols = table.interactions([L.USER_IDX, L.ITEM_IDX, L.WEIGHT, L.FIRST_TS, L.POSITIVE_TS])
    users, items = cols[L.USER_IDX].astype(np.int64), cols[L.ITEM_IDX].astype(np.int64)
    positive_ts = cols[L.POSITIVE_TS].astype(np.float64)  # null (never positive) -> NaN
    is_positive = ~np.isnan(positive_ts)
    label = is_positive & (positive_ts >= cut_ms)
    before = (cols[L.FIRST_TS] < cut_ms) & ~label
    popularity = np.bincount(items[before], minlength=n_items).astype(np.float64)
    candidates = np.unique(users[label])
    rng = np.random.default_rng(cfg["random_state"])
    in_eval = rng.random(n_users) < cfg["eval_user_share"]  # one draw: the halves never mix
    mine = candidates[in_eval[candidates] == (role == EVALUATION)]
    if len(mine) > cfg["max_users"]:
        mine = np.sort(rng.choice(mine, size=cfg["max_users"], replace=False))
    local = np.full(n_users, -1, np.int64)
    local[mine] = np.arange(len(mine))
    hist = before & (local[users] >= 0)
    history = sp.csr_matrix((cols[L.WEIGHT][hist].astype(np.float32),
                             (local[users[hist]], items[hist])), shape=(len(mine), n_items))
    lab = label & (local[users] >= 0)
    labels = pd.DataFrame({"user_row": users[lab], "item": items[lab]})
    return Requests(mine, history, labels, popularity, int(before.sum()),
                    int(label.sum()))


def query_histories(pre_cut: pd.DataFrame, asked: pd.Index, item_ids: pd.Index, n: int
                    ) -> np.ndarray:
    """int32 ``[m, n]``: each asked user's query history at the cut, from their pre-cut events
    by serving's rule (``tandem.features.query_history``: the last distinct items engaged, each
    at its latest engagement, newest first), -1 padded. ``pre_cut`` holds only the asked users'
    events with known items (:func:`prepare` reads nothing else)."""
    engaged = pre_cut[QH.is_engagement(pre_cut[S.EVENT_TYPE].to_numpy())]
    return QH.query_items(asked.get_indexer(engaged[S.USER_ID]),
                          item_ids.get_indexer(engaged[S.ITEM_ID]),
                          engaged[S.TS].to_numpy(np.int64), len(asked), n)


@dataclass
class Night:
    """The night's retrieval models from the bundle, in the bundle's catalog order."""

    item_factors: np.ndarray
    als_index: AnnIndex
    tower: Any  # tandem.models.user_tower.UserTower, or None when the run skipped the two-tower
    main_index: AnnIndex | None
    als_cfg: dict[str, Any]
    sequence: Any = None  # tandem.models.sequence.SequenceEncoder, or None for a bundle without it
    sequence_index: AnnIndex | None = None

    @classmethod
    def load(cls, bundle_dir: Path, als_cfg: dict[str, Any] = A.ALS_CONFIG) -> Night:
        from tandem.models.user_tower import UserTower

        tower = main = None
        if (bundle_dir / B.TT_ITEM_VECTORS).exists():
            tower = UserTower.load(bundle_dir / B.TT_USER_TOWER,
                                   np.load(bundle_dir / B.TT_ITEM_VECTORS))
            main = AnnIndex.load(bundle_dir / B.INDEX_MAIN)
        sequence = sequence_index = None
        if (bundle_dir / B.SEQ_MODEL).exists():
            from tandem.models.sequence import SequenceEncoder

            sequence = SequenceEncoder.load(bundle_dir / B.SEQ_MODEL,
                                            np.load(bundle_dir / B.SEQ_ITEM_VECTORS))
            sequence_index = AnnIndex.load(bundle_dir / B.INDEX_SEQUENCE)
        return cls(np.load(bundle_dir / B.ALS_ITEM_FACTORS),
                   AnnIndex.load(bundle_dir / B.INDEX_ALS), tower, main, als_cfg, sequence,
                   sequence_index)

    def query_vectors(self, req: Requests, recent: np.ndarray, profiles: pd.DataFrame | None
                      ) -> dict[str, np.ndarray]:
        """Per source, the request users' query vectors ``[m, d]`` (``recent``: their query
        histories, :func:`query_histories`)."""
        out = {"als": A.fold_in(self.item_factors, req.history, self.als_cfg)}
        if self.tower is not None:
            spec = self.tower.user_spec
            feats = spec.encode(profiles) if spec is not None and profiles is not None else None
            out["two_tower"] = self.tower.encode_batch(feats, recent)
        if self.sequence is not None:
            out["sequence"] = self.sequence.encode_batch(recent)
        return out


def _drop_seen(ids: np.ndarray, scores: np.ndarray, seen: sp.csr_matrix, k: int
               ) -> pd.DataFrame:
    """(local, item, score, rank) of each row's best ``k`` answers not in ``seen``."""
    m, width = ids.shape
    n_items = seen.shape[1]
    seen_keys = np.repeat(np.arange(m, dtype=np.int64), np.diff(seen.indptr)) * n_items \
        + seen.indices
    keys = np.arange(m, dtype=np.int64)[:, None] * n_items + ids
    valid = (ids >= 0) & ~np.isin(keys, seen_keys)
    rank = np.cumsum(valid, axis=1)
    keep = valid & (rank <= k)
    rows = np.broadcast_to(np.arange(m)[:, None], (m, width))
    return pd.DataFrame({"local": rows[keep], "item": ids[keep],
                         "score": scores[keep].astype(np.float32),
                         "rank": rank[keep].astype(np.float32)})


def retrieve(night: Night, req: Requests, queries: dict[str, np.ndarray], depth: dict[str, int],
             max_seen: int) -> dict[str, pd.DataFrame]:
    """Each source's top-``depth[source]`` unseen items per request user, through its index."""
    seen = req.history
    extra = int(min(np.diff(seen.indptr).max(initial=0), max_seen))
    n_items = seen.shape[1]
    out = {}
    for src, index in (("als", night.als_index), ("two_tower", night.main_index),
                       ("sequence", night.sequence_index)):
        if src in queries and src in depth:
            scores, ids = index.search(queries[src], min(depth[src] + extra, index.ntotal))
            out[src] = _drop_seen(ids, scores, seen, depth[src])
    if "popularity" in depth:
        best = np.argsort(-req.popularity, kind="stable")[:min(depth["popularity"] + extra,
                                                                n_items)]
        ids = np.broadcast_to(best, (len(req.user_rows), len(best)))
        out["popularity"] = _drop_seen(ids, req.popularity[ids], seen, depth["popularity"])
    return out


def candidates(lists: dict[str, pd.DataFrame], req: Requests, depth: dict[str, int]
               ) -> pd.DataFrame:
    """Union of the sources' lists cut at ``depth``: (user_row, item, <src>_score, <src>_rank),
    NaN where a source did not return the item; sorted by (user_row, item) (one ranker group
    per user), the frame ``tandem.evaluation.sources.candidates`` returns."""
    frames = [top[top["rank"] <= depth[src]]
              .rename(columns={"score": f"{src}_score", "rank": f"{src}_rank"})
              .set_index(["local", "item"]) for src, top in lists.items()]
    union = pd.concat(frames, axis=1).sort_index().reset_index()
    union.insert(0, "user_row", req.user_rows[union.pop("local").to_numpy()])
    return union


_DAY = ds.partitioning(pa.schema([(S.DATE, pa.string())]), flavor="hive")
LAKE_LABEL_ROW_BYTES = 120  # user, item (strings), ts, device, label in pandas


def _lake_rows(path: Path, partitioning, columns: list[str], user_ids: pd.Index,
               cut_ms: int, end_ms: int) -> pd.DataFrame:
    """``columns`` of the rows of ``user_ids`` with ``cut_ms <= ts < end_ms`` under ``path``
    (empty when the folder does not exist: the hourly jobs have not written it yet)."""
    if not path.exists() or not any(path.rglob("*.parquet")):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    lo, hi = pd.Timestamp(cut_ms, unit="ms"), pd.Timestamp(end_ms, unit="ms")
    where = ((ds.field(S.DATE) >= lo.strftime("%Y-%m-%d"))
             & (ds.field(S.DATE) <= hi.strftime("%Y-%m-%d"))
             & (ds.field(S.TS) >= cut_ms) & (ds.field(S.TS) < end_ms)
             & ds.field(S.USER_ID).isin(pa.array(list(user_ids), pa.string())))
    data = ds.dataset(path, format="parquet", partitioning=partitioning)
    within_driver_budget(data.count_rows(filter=where) * LAKE_LABEL_ROW_BYTES,
                         f"the request users' rows of {path}")
    return data.to_table(columns=columns, filter=where).to_pandas()


@dataclass
class LakeLabels:
    """What the hourly jobs recorded about the request users after the cut.

    Attributes
    ----------
    first : DataFrame indexed by user_row: ``ts`` and ``ctx_device`` of the user's first
        labelled row after the cut (an impression, or a rating for data without impressions):
        the moment and device of the request the ranker learns to answer
    positive, negative : DataFrames (user_row, item) of the pairs labelled 1 in
        ``lake/labels/ranking``, and of those labelled 0 there (shown but not engaged, rated
        low) or sampled into ``lake/negatives/ranking`` (``jobs/negative_sampling.py``)
    """

    first: pd.DataFrame
    positive: pd.DataFrame
    negative: pd.DataFrame


def lake_labels(paths, user_ids: pd.Index, item_ids: pd.Index, req: Requests, cut_ms: int,
                end_ms: int) -> LakeLabels:
    """Read ``lake/labels/ranking`` and ``lake/negatives/ranking`` for ``req``'s users in
    ``[cut, end)``; pairs of items outside the bundle's catalog are dropped."""
    asked = user_ids[req.user_rows]
    labels = _lake_rows(paths.ranking_labels, L.PARTITIONS,
                        [S.USER_ID, S.ITEM_ID, S.TS, S.CTX_DEVICE, S.LABEL], asked, cut_ms,
                        end_ms)
    negatives = _lake_rows(paths.ranking_negatives, _DAY, [S.USER_ID, S.ITEM_ID, S.TS], asked,
                           cut_ms, end_ms)

    def coded(frame: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame({"user_row": user_ids.get_indexer(frame[S.USER_ID]),
                            "item": item_ids.get_indexer(frame[S.ITEM_ID])})
        return out[(out["user_row"] >= 0) & (out["item"] >= 0)].drop_duplicates()

    label = pd.to_numeric(labels[S.LABEL]).to_numpy() if len(labels) else np.zeros(0)
    first = (labels.assign(user_row=user_ids.get_indexer(labels[S.USER_ID]))
             .sort_values([S.TS, S.ITEM_ID], kind="stable").drop_duplicates("user_row")
             .set_index("user_row")[[S.TS, S.CTX_DEVICE]])
    return LakeLabels(first, coded(labels[label > 0]),
                      pd.concat([coded(labels[label == 0]), coded(negatives)]).drop_duplicates())


def requests_at_labels(at_cut, lake: LakeLabels):
    """``at_cut`` (a ``tandem.evaluation.requests.Requests``) moved to each user's first labelled
    row: its time and device, so the context features (hour, device) and the point-in-time entity
    and session features vary as they do in the events; users without such a row stay at the
    cut, device unknown."""
    from tandem.evaluation.requests import Requests as EvalRequests

    first = lake.first.reindex(at_cut.user_rows)
    now = first[S.TS].to_numpy(dtype=np.float64, na_value=np.nan)
    return EvalRequests(at_cut.user_rows,
                        np.where(np.isnan(now), at_cut.now_ms, now).astype(np.int64),
                        first[S.CTX_DEVICE].to_numpy(object), at_cut.sequence_recent)


def ask_at_labels(paths, batch: Batch, cut_ms: int, end_ms: int) -> LakeLabels:
    """Read ``batch``'s users' lake labels (:func:`lake_labels`) and move ``batch.requests`` to
    each user's first labelled row (:func:`requests_at_labels`): the one rule by which the
    ranker's training and the nightly evaluation ask a request, with the hour and device
    serving's ranker sees. Returns the labels (the ranker's explicit negatives come from them).
    """
    lake = lake_labels(paths, batch.catalog.user_ids, batch.catalog.item_ids, batch.req, cut_ms,
                       end_ms)
    batch.requests = requests_at_labels(batch.requests, lake)
    return lake


def pair_mask(cands: pd.DataFrame, pairs: pd.DataFrame) -> np.ndarray:
    """bool [n]: the candidate's (user_row, item) is one of ``pairs``."""
    keys = pd.MultiIndex.from_arrays([pairs["user_row"], pairs["item"]])
    return pd.MultiIndex.from_arrays([cands["user_row"], cands["item"]]).isin(keys)


def label_mask(cands: pd.DataFrame, req: Requests) -> np.ndarray:
    """bool [n]: the candidate is one of its user's label pairs."""
    return pair_mask(cands, req.labels)


@dataclass
class Batch:
    """One role's request users at the cut, their candidates and what features need.

    ``lists`` holds each source's full retrieval list (evaluation measures recall on it),
    ``cands`` their union cut at the candidate depths, ``labels`` a bool per candidate,
    ``catalog``/``fitted``/``requests`` the inputs of ``tandem.evaluation.requests.feature_matrix``.
    """

    req: Requests
    lists: dict[str, pd.DataFrame]
    cands: pd.DataFrame
    labels: np.ndarray
    catalog: Any  # tandem.evaluation.protocol.Catalog, in the bundle's order
    fitted: Any  # tandem.evaluation.sources.Fitted: the request users' pre-cut events, the pre-cut
    # item events (or None) and the ItemSpace
    # tandem.evaluation.requests.Requests at the cut; at the labels after ask_at_labels
    requests: Any


def prepare(paths, bundle_dir: Path, start, end, cut_ms: int, role: str, cfg: dict[str, Any],
            item_events: bool) -> Batch:
    """Requests, retrieval through the night's indexes, and the feature inputs of ``role``.

    ``cfg`` carries the candidate depths (``als_k``, ``two_tower_k``, ``sequence_k``,
    ``popular_k``; a ``retrieval_k`` deeper list when set, for recall), ``als`` (fold-in) and
    ``night`` (:data:`NIGHT_CONFIG` overrides). Only the request users' events are read as a
    frame (their user, session and content inputs); ``item_events`` also reads every pre-cut
    event's item columns into numpy (``tandem.data.lake.read_item_events``) for the in-process item
    features -- False when the feature store serves them. The window is never a pandas frame.
    """
    from tandem.evaluation import protocol as E
    from tandem.evaluation import requests as EQ
    from tandem.evaluation import sources as ES

    night_cfg = {**NIGHT_CONFIG, **cfg.get("night", {})}
    table = L.TrainingTable.of(paths, bundle_dir.name)
    req = requests(table, cut_ms, role, night_cfg)
    if not len(req.user_rows):
        raise ValueError(
            f"no {role} request users: no pair of {bundle_dir.name}'s training table was first "
            f"engaged positively in [{pd.Timestamp(cut_ms, unit='ms', tz='UTC')}, {end}); the "
            "label window (label_days, else label_fraction of the interval) must end where the "
            "events do")
    night = Night.load(bundle_dir, cfg["als"])
    item_ids = pd.Index(pd.read_parquet(bundle_dir / B.ITEMS, columns=[S.ITEM_ID])[S.ITEM_ID])
    user_ids = pd.Index(pd.read_parquet(bundle_dir / B.USERS, columns=[S.USER_ID])[S.USER_ID])
    asked = user_ids[req.user_rows]
    data = L.read_window(paths, start, end, user_ids=list(asked))
    profiles = data.users.drop_duplicates(S.USER_ID).set_index(S.USER_ID)
    depth = {"als": cfg["als_k"], "popularity": cfg["popular_k"]}
    if night.tower is not None and cfg.get("two_tower") is not None:
        depth["two_tower"] = cfg["two_tower_k"]
    if night.sequence is not None and cfg.get("sequence") is not None:
        depth["sequence"] = cfg["sequence_k"]
    events = data.events
    known = (item_ids.get_indexer(events[S.ITEM_ID]) >= 0) \
        & (user_ids.get_indexer(events[S.USER_ID]) >= 0)
    pre_cut = events[known & (events[S.TS] < cut_ms)].reset_index(drop=True)
    recent = query_histories(pre_cut, asked, item_ids, night_cfg["history_len"])
    queries = night.query_vectors(req, recent, profiles.reindex(asked).reset_index())
    deep = {src: max(d, cfg.get("retrieval_k", 0)) for src, d in depth.items()}
    lists = retrieve(night, req, queries, deep, night_cfg["max_seen"])
    items = data.items.drop_duplicates(S.ITEM_ID).set_index(S.ITEM_ID).reindex(item_ids)
    catalog = E.Catalog(user_ids, item_ids, items.reset_index(),
                        profiles.reindex(user_ids).reset_index())
    space = RF.ItemSpace(RF.unit_rows(night.item_factors), table.cooc())
    # the sequence model (for sequence_affinity) queried as its retrieval source is
    sequence = night.sequence if "sequence" in depth else None
    fitted = ES.Fitted(pre_cut, req.history, req.popularity, None, None, space,
                       sequence=sequence,
                       item_events=L.read_item_events(paths, start, cut_ms, item_ids)
                       if item_events else None)
    at_cut = EQ.Requests(req.user_rows, np.full(len(req.user_rows), cut_ms, np.int64),
                         np.full(len(req.user_rows), None, dtype=object),
                         recent if sequence is not None else None)
    if cfg.get("content_k"):  # serving's genre-content source, on the same profile
        depth["content"] = cfg["content_k"]
        inputs = ES.content_inputs(fitted.history, catalog, req.popularity, req.user_rows,
                                   cfg["play_dwell_ms"])
        lists["content"] = ES.content_lists(inputs, req.history, depth["content"])
    cands = candidates(lists, req, depth)
    return Batch(req, lists, cands, label_mask(cands, req), catalog, fitted, at_cut)
