"""The offline evaluation run (``make eval``): ranker training on inner splits, the test pass
of every model, the re-ranking sweep and :func:`evaluate`, which ties them together.

The protocol's rules (split, relevance, models, ranker labels, re-ranking, tuning) are in
:mod:`tandem.evaluation.protocol`; the sources in :mod:`tandem.evaluation.sources`, the request
features in :mod:`tandem.evaluation.requests`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tandem import schema as S
from tandem.config import TuningSettings
from tandem.data.dataset import Dataset, positives
from tandem.evaluation import diversify_sweep as DS
from tandem.evaluation import metrics as M
from tandem.evaluation import tuning
from tandem.evaluation.protocol import (
    EVAL_CONFIG,
    MODELS,
    Catalog,
    Progress,
    _indexed,
    _quiet,
    relevant_pairs,
    temporal_split,
)
from tandem.evaluation.requests import Requests, feature_matrix, requests_from
from tandem.evaluation.sources import (
    Fitted,
    _fit_tower,
    candidates,
    engaged_pairs,
    fit_sources,
    session_intents,
    source_scores,
    top_lists,
)
from tandem.features import entity as F
from tandem.features import ranking_features as RF
from tandem.models import als as A
from tandem.models import ranker as R
from tandem.policy import diversify as D


def _group_starts(users: np.ndarray) -> np.ndarray:
    """Start of each run of equal ``users`` (a user's candidates are contiguous)."""
    return np.r_[0, np.flatnonzero(np.diff(users)) + 1] if len(users) else np.zeros(0, int)


def group_intents(fitted: Fitted, catalog: Catalog, cands: pd.DataFrame,
                  play_dwell_ms: int | None) -> np.ndarray:
    """The session intent (the calibration target of :func:`diversified`) of each user's run of
    ``cands``, in run order: what serving's re-ranking reads at the request."""
    users = cands["user_row"].to_numpy()
    return session_intents(fitted, catalog, users[_group_starts(users)], play_dwell_ms)


def diversified(fitted: Fitted, catalog: Catalog, cands: pd.DataFrame, ranked: np.ndarray,
                k: int, cfg: dict[str, Any], intents: np.ndarray | None = None) -> np.ndarray:
    """Positions into ``cands`` of each user's ``k`` shown items, in the order shown: serving's
    re-ranking (``tandem.policy.diversify.rerank``: MMR over the genre sets or serving's item
    vectors -- the two-tower's, unit ALS factors without it -- as ``cfg["mmr_similarity"]``
    says, the genre cap and the calibration to each user's
    session intent, ``intents`` of :func:`group_intents`; None: no calibration) on the ranker's
    scores. One call per user (the request path's own loop), never per candidate."""
    vectors = (fitted.tower.item_vectors() if fitted.tower is not None
               else RF.unit_rows(fitted.als.item_factors))
    genres = F.genre_multi_hot(catalog.items[S.GENRES])
    users = cands["user_row"].to_numpy()
    items = cands["item"].to_numpy()
    starts = _group_starts(users)
    ends = np.r_[starts[1:], len(users)]
    picked = [lo + D.rerank(ranked[lo:hi], items[lo:hi], vectors, genres, k, cfg,
                            None if intents is None else intents[g])
              for g, (lo, hi) in enumerate(zip(starts, ends, strict=True))]
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def _position_in_group(users: np.ndarray) -> np.ndarray:
    """0-based position of each row within its run of equal ``users`` (the shown order)."""
    starts = _group_starts(users)
    return (np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)])))\
        .astype(float)


def _pred_frame(catalog: Catalog, user_rows: np.ndarray, items: np.ndarray,
                scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({M.USER: catalog.user_ids[user_rows], M.ITEM: catalog.item_ids[items],
                         M.PREDICTION: scores})


def score_models(pred: pd.DataFrame, rel: pd.DataFrame, train: pd.DataFrame, catalog: Catalog,
                 k: int, primitive: pd.DataFrame | None = None) -> dict[str, float]:
    """Every metric of ``tandem.evaluation.metrics`` at ``k`` for one model's predictions;
    serendipity only with a ``primitive`` model's predictions (the popularity lists) to be
    unexpected from."""
    out = {name.replace("_at_k", f"@{k}"): fn(rel, pred, k=k) for name, fn in M.METRICS.items()}
    vectors = pd.DataFrame(F.genre_multi_hot(catalog.items[S.GENRES]), index=catalog.item_ids)
    out[f"coverage@{k}"] = M.catalog_coverage(pred, len(catalog.item_ids), k)
    out[f"diversity@{k}"] = M.intra_list_diversity(pred, vectors, k)
    out[f"novelty@{k}"] = M.novelty(pred, train, k)
    if primitive is not None:
        out[f"serendipity@{k}"] = M.serendipity(rel, pred, primitive, k)
    return out


def tune_sources(train: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any],
                 settings: TuningSettings, progress: Progress = _quiet
                 ) -> dict[str, tuning.StudyResult]:
    """Optuna studies of ALS and (when configured) the two-tower, scored by NDCG@10 of the
    inner split of ``train`` (the split the ranker's labels come from): the test period is
    never seen. Returns each model's :class:`tandem.evaluation.tuning.StudyResult`."""
    inner_train, inner_val = temporal_split(train, cfg["test_fraction"])
    rel = relevant_pairs(inner_val, cfg["play_dwell_ms"])
    rel = pd.DataFrame({M.USER: catalog.user_ids.get_indexer(rel[S.USER_ID]),
                        M.ITEM: catalog.item_ids.get_indexer(rel[S.ITEM_ID])})
    rows = np.unique(rel[M.USER].to_numpy())
    hist = _indexed(inner_train, catalog)
    seen = sp.csr_matrix((np.ones(len(hist), np.float32), (hist["user_idx"], hist["item_idx"])),
                         shape=(len(catalog.user_ids), len(catalog.item_ids)))
    matrix = A.confidence_matrix(A.pair_confidence(inner_train, cfg["als"]), catalog.user_ids,
                                 catalog.item_ids)

    def als(params: dict[str, Any]) -> float:
        fit = A.fit_als(matrix, catalog.user_ids, catalog.item_ids, {**cfg["als"], **params})
        return tuning.retrieval_ndcg(fit.user_factors[rows], fit.item_factors, seen, rows, rel)

    pairs = engaged_pairs(hist, cfg["play_dwell_ms"])  # the same in every trial

    def two_tower(params: dict[str, Any]) -> float:
        model = _fit_tower(hist, catalog, {**cfg, "two_tower": {**cfg["two_tower"], **params}},
                           pairs)
        return tuning.retrieval_ndcg(model.user_vectors()[rows], model.item_vectors(), seen,
                                     rows, rel)

    progress("tuning ALS on the inner split")
    out = {tuning.ALS: tuning.run_study(tuning.ALS, als, settings)}
    if cfg.get("two_tower") is not None:
        progress("tuning the two-tower on the inner split")
        out[tuning.TWO_TOWER] = tuning.run_study(tuning.TWO_TOWER, two_tower, settings)
    return out


def explicit_negatives(heldout: pd.DataFrame, play_dwell_ms: int | None) -> pd.DataFrame:
    """Distinct (user_id, item_id) the held-out events touched without any positive event:
    shown or played but not engaged, or rated below the positive threshold -- the label-0 rows
    ``jobs/build_labels.py`` writes to ``lake/labels/ranking`` (impressions with their outcome,
    ratings otherwise)."""
    pairs = heldout[[S.USER_ID, S.ITEM_ID]].assign(pos=positives(heldout, play_dwell_ms))
    any_pos = pairs.groupby([S.USER_ID, S.ITEM_ID], sort=False)["pos"].any()
    return any_pos[~any_pos].reset_index()[[S.USER_ID, S.ITEM_ID]]


def _pair_mask(cands: pd.DataFrame, pairs: pd.DataFrame, catalog: Catalog) -> np.ndarray:
    """bool [len(cands)]: the candidate's (user, item) is one of ``pairs`` (id columns)."""
    keys = pd.MultiIndex.from_arrays([catalog.user_ids.get_indexer(pairs[S.USER_ID]),
                                      catalog.item_ids.get_indexer(pairs[S.ITEM_ID])])
    return pd.MultiIndex.from_arrays([cands["user_row"], cands["item"]]).isin(keys)


@dataclass
class InnerSplit:
    """One inner temporal split: its sources, requests, relevant pairs and every candidate of
    the holdout's users (the validation lists re-rank them)."""

    fitted: Fitted
    req: Requests
    rel: pd.DataFrame
    cands: pd.DataFrame


def _ranker_rows(train: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any],
                 progress: Progress
                 ) -> tuple[InnerSplit, np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """One inner temporal split of ``train``: (the split, the ranker's rows ``X``, their labels
    and user rows, the split's inner training part). Sources are
    fit on the inner training part; candidates are labelled with the inner holdout's positives,
    its explicit negatives kept (:func:`R.training_rows`)."""
    inner_train, inner_val = temporal_split(train, cfg["test_fraction"])
    fitted = fit_sources(inner_train, catalog, cfg, progress)
    rel = relevant_pairs(inner_val, cfg["play_dwell_ms"])
    users = pd.Index(pd.unique(rel[S.USER_ID]))
    req = requests_from(inner_val, catalog, users)
    progress("ranker candidates")
    cands = candidates(fitted, req.user_rows, cfg)
    labels = _pair_mask(cands, rel, catalog)
    shown = _pair_mask(cands, explicit_negatives(inner_val, cfg["play_dwell_ms"]), catalog)
    keep = R.training_rows(labels, shown, cands["user_row"].to_numpy(),
                           cfg["ranker_negative_rate"], cfg["ranker"]["random_state"])
    kept = cands[keep].reset_index(drop=True)
    progress("ranker features")
    X = feature_matrix(fitted, catalog, req, kept, cfg)
    return (InnerSplit(fitted, req, rel, cands), X, labels[keep],
            cands["user_row"].to_numpy()[keep], inner_train)


@dataclass
class TwoStage:
    """The ranker and what it learned from: every inner split's rows (``groups``: user row +
    level x n_users), the first split (the diversify sweep's validation lists come from it)
    and the ranker's study (or None)."""

    model: Any
    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    first: InnerSplit
    study: Any = None


def train_two_stage(train: pd.DataFrame, catalog: Catalog, cfg: dict[str, Any],
                    progress: Progress = _quiet, settings: TuningSettings | None = None
                    ) -> TwoStage:
    """Ranker from nested inner temporal splits of ``train``. With ``settings`` the ranker's
    parameters are tuned first on its own rows (a seeded 20 % of the inner splits' users held
    out).

    Split ``j`` holds out the last fraction of split ``j-1``'s training part, so each user
    contributes up to ``ranker_splits`` requests, each at its own time and with only its past
    as features: more labelled requests from the same history, none of them from the test
    period.
    """
    parts, first, history = [], None, train
    for level in range(cfg["ranker_splits"]):
        split, X, labels, users, history = _ranker_rows(history, catalog, cfg, progress)
        parts.append((X, labels, users + level * len(catalog.user_ids)))
        first = split if first is None else first
    X, labels, groups = (np.concatenate(p) for p in zip(*parts, strict=True))
    y = labels.astype(np.int32)
    study = None
    if settings is not None:
        progress("tuning the ranker on the inner split")
        study = tuning.run_study(tuning.RANKER, tuning.ranker_objective(
            X, y, groups, cfg["ranker"], seed=settings.seed), settings)
        cfg = {**cfg, "ranker": {**cfg["ranker"], **study.params}}
    progress("ranker training")
    model = R.train_ranker(X, y, groups, cfg["ranker"])
    return TwoStage(model, X, y, groups, first, study)


@dataclass
class RankedLists:
    """Users' candidates ranked once, ready to be re-ranked with any diversify setting."""

    fitted: Fitted
    cands: pd.DataFrame
    ranked: np.ndarray
    rel: pd.DataFrame  # (user_id, item_id) relevant pairs
    baseline: pd.DataFrame  # ALS's top-k of the same users (a prediction frame)
    intents: np.ndarray  # [users' runs in cands, n_genres] calibration targets (group_intents)


def validation_lists(fit: TwoStage, catalog: Catalog, cfg: dict[str, Any]
                     ) -> RankedLists | None:
    """The first inner split's holdout, ranked by a ranker that never saw its users (None when
    the draw holds out no user).

    A seeded ``sweep_user_share`` of that split's users is held out: a second ranker learns on
    every split's rows of the other users only (same parameters), and ranks every candidate of
    the held-out users -- ranked by the final ranker they would be in-sample (it learned from
    them), which flatters relevance against diversity. Baseline: the split's ALS top-k.
    """
    split, k = fit.first, cfg["k"]
    rng = np.random.default_rng(cfg["ranker"]["random_state"])
    held = split.req.user_rows[rng.random(len(split.req.user_rows)) < cfg["sweep_user_share"]]
    if not len(held):
        return None
    learn = ~np.isin(fit.groups % len(catalog.user_ids), held)
    model = R.train_ranker(fit.X[learn], fit.y[learn], fit.groups[learn], cfg["ranker"])
    mine = np.isin(split.req.user_rows, held)
    req = Requests(split.req.user_rows[mine], split.req.now_ms[mine], split.req.device[mine])
    cands = split.cands[np.isin(split.cands["user_row"].to_numpy(), held)].reset_index(
        drop=True)
    ranked = R.predict(model, feature_matrix(split.fitted, catalog, req, cands, cfg))
    held_ids = set(catalog.user_ids[held])
    rel = split.rel[split.rel[S.USER_ID].isin(held_ids)].reset_index(drop=True)
    top = top_lists(split.fitted.als.scores(req.user_rows), k, split.fitted.seen, req.user_rows)
    baseline = _pred_frame(catalog, top["user_row"].to_numpy(), top["item"].to_numpy(),
                           -top["rank"].to_numpy(float))
    return RankedLists(split.fitted, cands, ranked, rel, baseline,
                       group_intents(split.fitted, catalog, cands, cfg["play_dwell_ms"]))


def _shown_frame(lists: RankedLists, catalog: Catalog, k: int, setting: dict[str, Any]
                 ) -> pd.DataFrame:
    """The prediction frame of the lists as shown with one diversify ``setting``."""
    users = lists.cands["user_row"].to_numpy()
    shown = diversified(lists.fitted, catalog, lists.cands, lists.ranked, k, setting,
                        lists.intents)
    return _pred_frame(catalog, users[shown], lists.cands["item"].to_numpy()[shown],
                       -_position_in_group(users[shown]))


def diversify_sweep(valid: RankedLists, test: RankedLists, catalog: Catalog,
                    cfg: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every setting of ``cfg["diversify_grid"]`` on both splits' ranked lists (one re-rank each,
    never a re-ranking of the ranker), and the setting
    :func:`tandem.evaluation.diversify_sweep.choose` picks on the validation rows. Returns (rows
    with ``split``, the choice and its evidence)."""
    k = cfg["k"]
    n_items = len(catalog.item_ids)
    genres = pd.DataFrame(F.genre_multi_hot(catalog.items[S.GENRES]), index=catalog.item_ids)
    rows = []
    for setting in DS.settings(cfg["diversify_grid"], cfg["diversify"]):
        for name, lists in (("validation", valid), ("test", test)):
            rows.append({"split": name, **{key: setting[key] for key in DS.KEYS},
                         **DS.list_metrics(_shown_frame(lists, catalog, k, setting), lists.rel,
                                           n_items, genres, k)})
    baseline = DS.list_metrics(valid.baseline, valid.rel, n_items, genres, k)
    chosen, met = DS.choose([r for r in rows if r["split"] == "validation"], baseline,
                            cfg["diversify"], k)
    return rows, {**chosen, "met_rule": met, "validation_als": baseline,
                  "validation_users": int(valid.cands["user_row"].nunique()),
                  "rule": "best validation NDCG among settings with validation coverage and "
                          "diversity >= ALS's on the same users; else the default"}


def evaluate(data: Dataset, cfg: dict[str, Any] = EVAL_CONFIG,
             progress: Progress = _quiet) -> dict[str, Any]:
    """Run the whole protocol on one dataset; returns the report dict (see jobs/evaluate.py)."""
    t_start = time.perf_counter()
    k = cfg["k"]
    catalog = Catalog.of(data)
    progress("temporal split")
    train, test = temporal_split(data.events, cfg["test_fraction"])
    rel = relevant_pairs(test, cfg["play_dwell_ms"])
    users = pd.Index(pd.unique(rel[S.USER_ID]))
    rows = catalog.user_ids.get_indexer(users)

    t0 = time.perf_counter()
    settings = cfg.get("tune")
    studies = tune_sources(train, catalog, cfg, settings, progress) if settings else {}
    cfg = {**cfg, **{m: {**cfg[m], **r.params} for m, r in studies.items()}}
    t_tune = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit = train_two_stage(train, catalog, cfg, progress, settings)
    if fit.study is not None:
        studies[tuning.RANKER] = fit.study
        cfg = {**cfg, "ranker": {**cfg["ranker"], **fit.study.params}}
    t_ranker = time.perf_counter() - t0
    valid = None
    if cfg.get("diversify_grid"):
        progress("diversify sweep: the validation split's lists")
        t0 = time.perf_counter()
        valid = validation_lists(fit, catalog, cfg)
        t_valid = time.perf_counter() - t0
    progress("refitting sources on the full training data")
    fitted = fit_sources(train, catalog, cfg, progress)
    scores = source_scores(fitted, rows)

    preds, retrieval = {}, {}
    for src, s in scores.items():
        top = top_lists(s, cfg["retrieval_k"], fitted.seen, rows)
        retrieval[src] = M.recall_at_k(rel, _pred_frame(catalog, top["user_row"].to_numpy(),
                                                        top["item"].to_numpy(), -top["rank"]),
                                       k=cfg["retrieval_k"])
        head = top[top["rank"] <= k]
        preds[src] = _pred_frame(catalog, head["user_row"].to_numpy(), head["item"].to_numpy(),
                                 -head["rank"].to_numpy(float))
    progress("two-stage: candidates, features, ranking")
    t0 = time.perf_counter()
    req = requests_from(test, catalog, users)
    cands = candidates(fitted, rows, cfg, scores)
    X = feature_matrix(fitted, catalog, req, cands, cfg)
    ranked = R.predict(fit.model, X)
    t_rank = time.perf_counter() - t0
    union = _pred_frame(catalog, cands["user_row"].to_numpy(), cands["item"].to_numpy(),
                        np.zeros(len(cands)))
    retrieval["combined"] = M.recall_at_k(rel, union, k=len(catalog.item_ids))
    test_lists = RankedLists(fitted, cands, ranked, rel, preds["als"],
                             group_intents(fitted, catalog, cands, cfg["play_dwell_ms"]))
    sweep = chosen = None
    if valid is not None:
        progress("diversify sweep: re-ranking with every setting")
        t0 = time.perf_counter()
        sweep, chosen = diversify_sweep(valid, test_lists, catalog, cfg)
        cfg = {**cfg, "diversify": {**cfg["diversify"],
                                    **{key: chosen[key] for key in DS.KEYS}}}
        timings_sweep = {"diversify_validation_lists": t_valid,
                         "diversify_sweep": time.perf_counter() - t0}
    preds["two_stage"] = _shown_frame(test_lists, catalog, k, cfg["diversify"])

    progress("metrics")
    models = {name: score_models(preds[name], rel, train, catalog, k, preds.get("popularity"))
              for name in MODELS if name in preds}
    if "two_tower" not in preds:
        models["two_tower"] = {"missing": "two-tower source disabled or unavailable"}
    if "sequence" not in preds:
        models["sequence"] = {"missing": "sequence source disabled or unavailable"}
    return {
        "dataset": data.name,
        "protocol": {
            "split": f"per-user temporal holdout, last {cfg['test_fraction']:.0%} of each "
                     "user's events by time (ties by event_id hash) are test",
            "relevant": "rating >= 4 for explicit data, any positive engagement otherwise",
            "filter": "items seen in training are excluded",
            "users": "averaged over users with >= 1 relevant test item",
            "k": k, "n_users": int(len(users)), "n_test_relevant": int(len(rel)),
            "n_train_events": int(len(train)), "n_test_events": int(len(test)),
            "ranker": "LightGBM lambdarank on retrieval candidates, labels from "
                      f"{cfg['ranker_splits']} nested inner temporal splits of training data "
                      "(explicit negatives kept); sources refit on full training data",
            "diversify": "serving's re-ranking (tandem.policy.diversify.rerank) of the ranked "
                         "lists; with a sweep, its (mmr_lambda, genre_cap, calibration, "
                         "mmr_similarity) is chosen "
                         "on the first inner split's held-out users "
                         "(tandem.evaluation.diversify_sweep), never on test",
        },
        "models": models,
        "retrieval": {f"recall@{cfg['retrieval_k']}": {k_: v for k_, v in retrieval.items()
                                                        if k_ != "combined"},
                      "recall_combined": retrieval["combined"],
                      "candidates_per_user": float(len(cands) / max(len(users), 1))},
        "tuning": {m: {"params": r.params, "val_ndcg@10": r.value,
                       "default_val_ndcg@10": r.default_value, "trials": r.trials}
                   for m, r in studies.items()},
        "diversify": {key: cfg["diversify"][key] for key in ("mmr_lambda", "mmr_pool",
                                                              "genre_cap", "calibration",
                                                              "mmr_similarity")},
        "diversify_sweep": sweep,
        "diversify_chosen": chosen,
        "timings_s": {"tuning": t_tune, "ranker_train_total": t_ranker, **fitted.timings,
                      "two_stage_test_pass": t_rank, **(timings_sweep if sweep else {}),
                      "total": time.perf_counter() - t_start},
        "ranker": {"rows": len(fit.groups), "groups": int(len(np.unique(fit.groups)))},
    }
