"""Hyper-parameter tuning with Optuna: bounded studies, each trial an MLflow run, and the night's
chosen parameters (``<models>/<run_id>/tuned.json``) that the trainers overlay on their defaults.

A study maximises validation NDCG@10 (``tandem.evaluation.metrics.ndcg_at_k``) with a seeded TPE
sampler, at most ``n_trials`` trials and ``timeout_s`` seconds (``tandem.config.TuningSettings``; a
trial that has started finishes). Its first trial is the current defaults, so the chosen parameters
are never worse than the defaults on the validation split. Every trial is an MLflow run nested under
its study's run, with the trial's parameters and its validation metric.

The validation split is carved from the TRAINING part of the night's window, never from the
evaluation's period: :func:`validation_split` keeps the pairs before the label cut (the period
the ranker learns from and the nightly evaluation scores) and holds out its last
``val_fraction`` -- the pairs first engaged positively in ``[val_cut, cut)`` are the validation
labels, the pairs seen before ``val_cut`` the training rows. (A pair's ALS weight is the table's
sum over the whole window, so a pair begun before ``val_cut`` carries its later events' weight
too: the table keeps one row per pair. Labels never do.)

``tuned.json``::

    {"format": 1, "source": "study" | "reused", "reused_from": <run_id> | null,
     "tuned_on": {"run_id", "start", "val_cut", "cut"}, "settings": {...},
     "models": {"als" | "two_tower" | "ranker": {"params": {...}, "value", "default_value",
                                                 "trials", "elapsed_s", "mlflow_run_id"}}}

Trainers read it through :func:`overlay` (an absent file or model means the defaults); the
registry step logs it with the bundle (it is a file of the bundle folder).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tandem.config import TuningSettings
from tandem.data import lake as L
from tandem.evaluation import metrics as M
from tandem.models import als as A
from tandem.models.bundle import TUNED_PARAMS
from tandem.models.tracking import RunLogger, metric_key, start_run

log = logging.getLogger(__name__)

FORMAT = 1
ALS, TWO_TOWER, RANKER = "als", "two_tower", "ranker"
METRIC = "val_ndcg@10"
K = 10
SCORE_CHUNK = 128  # users scored per matrix product (128 x 1M items x 4 B = 0.5 GB)


# ---------------------------------------------------------------------------- search spaces

def als_space(trial) -> dict[str, Any]:
    return {"factors": trial.suggest_categorical("factors", [16, 32, 64, 128]),
            "regularization": trial.suggest_float("regularization", 0.01, 5.0, log=True),
            "alpha": trial.suggest_float("alpha", 0.5, 40.0, log=True),
            "iterations": trial.suggest_int("iterations", 5, 25)}


def two_tower_space(trial) -> dict[str, Any]:
    return {"dim": trial.suggest_categorical("dim", [32, 64, 128]),
            "lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True),
            "epochs": trial.suggest_int("epochs", 2, 8),
            "temperature": trial.suggest_float("temperature", 0.03, 0.3, log=True)}


def ranker_space(trial) -> dict[str, Any]:
    """LightGBM's ``min_data_in_leaf`` is ``min_child_samples`` in the sklearn API the ranker
    config uses (setting both aliases makes LightGBM warn and pick one)."""
    return {"num_leaves": trial.suggest_int("num_leaves", 7, 63, log=True),
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            "min_child_samples": trial.suggest_int("min_child_samples", 10, 200, log=True),
            "n_estimators": trial.suggest_int("n_estimators", 50, 300, step=25)}


SPACES: dict[str, Callable[[Any], dict[str, Any]]] = {
    ALS: als_space, TWO_TOWER: two_tower_space, RANKER: ranker_space}


def defaults(model: str) -> dict[str, Any]:
    """Today's default values of the tuned keys (the study's first trial)."""
    if model == ALS:
        return {k: A.ALS_CONFIG[k] for k in ("factors", "regularization", "alpha", "iterations")}
    if model == RANKER:
        from tandem.models.ranker import RANKER_CONFIG

        return {k: RANKER_CONFIG[k] for k in ("num_leaves", "learning_rate",
                                              "min_child_samples", "n_estimators")}
    from tandem.models.two_tower import TwoTowerConfig

    base = TwoTowerConfig()
    return {"dim": base.dim, "lr": base.lr, "epochs": base.epochs,
            "temperature": base.temperature}


# ------------------------------------------------------------------------------------ studies

@dataclass
class StudyResult:
    """What one model's study chose, with its evidence."""

    params: dict[str, Any]
    value: float  # validation NDCG@10 of ``params``
    default_value: float | None  # of the defaults (the first trial), None if it did not finish
    trials: int  # trials that finished
    elapsed_s: float
    mlflow_run_id: str | None


def run_study(model: str, objective: Callable[[dict[str, Any]], float],
              settings: TuningSettings, parent: RunLogger | None = None) -> StudyResult:
    """Maximise ``objective(params)`` over :data:`SPACES` ``[model]`` within the bounds.

    The study is one MLflow run (``tune_<model>``, nested under ``parent`` when given), each
    trial a run nested under it with the trial's params and :data:`METRIC`.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=settings.seed,
                                         n_startup_trials=max(1, settings.n_trials // 2))
    study = optuna.create_study(direction="maximize", sampler=sampler,
                                study_name=f"tandem-{model}")
    study.enqueue_trial(defaults(model))
    t0 = time.perf_counter()
    with start_run(f"tune_{model}", {"n_trials": settings.n_trials,
                                     "timeout_s": settings.timeout_s, "seed": settings.seed},
                   parent_run_id=parent.run_id if parent else None) as study_run:

        def trial_fn(trial) -> float:
            params = SPACES[model](trial)
            with start_run(f"tune_{model}_{trial.number}", params,
                           parent_run_id=study_run.run_id) as run:
                t_fit = time.perf_counter()
                value = float(objective(params))
                run.log_metrics({METRIC: value, "trial_s": time.perf_counter() - t_fit})
            return value

        study.optimize(trial_fn, n_trials=settings.n_trials, timeout=settings.timeout_s)
        done = [t for t in study.trials if t.value is not None]
        best = study.best_trial
        first = study.trials[0].value
        study_run.log_params({f"best.{k}": v for k, v in best.params.items()})
        study_run.log_metrics({METRIC: best.value, "trials": len(done),
                               **({"default." + METRIC: first} if first is not None else {})})
    return StudyResult(dict(best.params), float(best.value), first, len(done),
                       time.perf_counter() - t0, study_run.run_id)


# --------------------------------------------------------------------- the validation split

@dataclass
class ValidationSplit:
    """Sampled users' pre-cut pairs, held out in time (see the module docstring).

    Attributes
    ----------
    users : int64 [m], the table's user rows of the fit sample (ascending)
    train : float32 CSR [m, n_items], ALS weight of each pair seen before ``val_cut``
    seen : float32 CSR [m, n_items], 1 for every pair seen before ``val_cut`` (never recommended)
    positives : DataFrame (user_idx: local row, item_idx, ts) of pairs positive before ``val_cut``
    engaged : DataFrame, same columns, of pairs engaged before ``val_cut`` (ts: first engagement):
        the query histories (``tandem.features.query_history``), as the nightly two-tower trains
    val_rows : int64 [v], local rows of the validation users
    relevant : DataFrame (user_id: local row, item_id: item row) of the validation labels
    """

    users: np.ndarray
    train: sp.csr_matrix
    seen: sp.csr_matrix
    positives: pd.DataFrame
    engaged: pd.DataFrame
    val_rows: np.ndarray
    relevant: pd.DataFrame
    val_cut_ms: int
    cut_ms: int


def validation_split(table: L.TrainingTable, start_ms: int, cut_ms: int,
                     settings: TuningSettings) -> ValidationSplit:
    """Hold out the last ``val_fraction`` of ``[start, cut)``; sample the users (seeded): at most
    ``max_val_users`` with a validation label and a pre-``val_cut`` pair, plus other users up to
    ``max_fit_users`` in all."""
    val_cut = int(cut_ms - (cut_ms - start_ms) * settings.val_fraction)
    cols = table.interactions([L.USER_IDX, L.ITEM_IDX, L.WEIGHT, L.FIRST_TS, L.POSITIVE_TS,
                               L.ENGAGED_TS])
    users, items = cols[L.USER_IDX].astype(np.int64), cols[L.ITEM_IDX].astype(np.int64)
    positive_ts = cols[L.POSITIVE_TS].astype(np.float64)  # null -> NaN
    label = (positive_ts >= val_cut) & (positive_ts < cut_ms)
    before = (cols[L.FIRST_TS] < val_cut) & ~label
    rng = np.random.default_rng(settings.seed)
    known = np.unique(users[before])
    candidates = np.intersect1d(np.unique(users[label]), known)
    val = np.sort(rng.choice(candidates, min(settings.max_val_users, len(candidates)),
                             replace=False))
    others = np.setdiff1d(known, val)
    n_more = max(0, min(settings.max_fit_users - len(val), len(others)))
    fit = np.union1d(val, rng.choice(others, n_more, replace=False))
    local = np.full(table.shape()[0], -1, np.int64)
    local[fit] = np.arange(len(fit))
    n_items = table.shape()[1]
    keep = before & (local[users] >= 0)
    rows, cols_ = local[users[keep]], items[keep]
    train = sp.csr_matrix((cols[L.WEIGHT][keep].astype(np.float32), (rows, cols_)),
                          shape=(len(fit), n_items))
    train.eliminate_zeros()
    seen = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols_)),
                         shape=(len(fit), n_items))
    pos = keep & (positive_ts < val_cut)
    positives = pd.DataFrame({"user_idx": local[users[pos]], "item_idx": items[pos],
                              "ts": positive_ts[pos].astype(np.int64)})
    engaged_ts = cols[L.ENGAGED_TS].astype(np.float64)  # null -> NaN
    eng = keep & (engaged_ts < val_cut)
    engaged = pd.DataFrame({"user_idx": local[users[eng]], "item_idx": items[eng],
                            "ts": engaged_ts[eng].astype(np.int64)})
    lab = label & np.isin(users, val)
    relevant = pd.DataFrame({M.USER: local[users[lab]], M.ITEM: items[lab]})
    return ValidationSplit(fit, train, seen, positives, engaged, local[val], relevant, val_cut,
                           cut_ms)


def retrieval_ndcg(user_vectors: np.ndarray, item_vectors: np.ndarray, seen: sp.csr_matrix,
                   rows: np.ndarray, relevant: pd.DataFrame) -> float:
    """NDCG@10 of users ``rows`` (their vectors in ``user_vectors``, same order) ranking their
    top-10 items by dot product, items in their ``seen`` row excluded; ``relevant`` holds
    (user_id: row, item_id: item). Chunked: the largest array is ``SCORE_CHUNK x n_items``."""
    frames = []
    for lo in range(0, len(rows), SCORE_CHUNK):
        chunk = rows[lo:lo + SCORE_CHUNK]
        idx, _ = A.top_k_items(user_vectors[lo:lo + SCORE_CHUNK] @ item_vectors.T, K,
                               exclude=seen[chunk])
        frames.append(pd.DataFrame({M.USER: np.repeat(chunk, idx.shape[1]),
                                    M.ITEM: idx.ravel(),
                                    M.PREDICTION: -np.tile(np.arange(idx.shape[1]), len(chunk))}))
    return M.ndcg_at_k(relevant, pd.concat(frames, ignore_index=True), k=K)


def als_objective(split: ValidationSplit, base: Mapping[str, Any]
                  ) -> Callable[[dict[str, Any]], float]:
    """A trial: fit ALS on the sample's pre-``val_cut`` weights, score the validation users."""

    def objective(params: dict[str, Any]) -> float:
        n_users, n_items = split.train.shape
        factors = A.fit_als(split.train, pd.RangeIndex(n_users), pd.RangeIndex(n_items),
                            {**base, **params})
        return retrieval_ndcg(factors.user_factors[split.val_rows], factors.item_factors,
                              split.seen, split.val_rows, split.relevant)

    return objective


def two_tower_objective(split: ValidationSplit, items: pd.DataFrame, users: pd.DataFrame,
                        base: Mapping[str, Any]) -> Callable[[dict[str, Any]], float]:
    """A trial: train the towers (``tandem.models.tower_inputs.fit_tower``) on the sample's
    positives before ``val_cut``, with their engaged pairs as query histories (as the nightly
    trainer); a validation user's vector comes from their profile and their query history at
    ``val_cut``."""
    from tandem.models.tower_inputs import fit_tower

    sample_users = users.iloc[split.users]

    def objective(params: dict[str, Any]) -> float:
        model = fit_tower(split.positives, items, sample_users,
                          {**base, "two_tower": {**base["two_tower"], **params}},
                          history=split.engaged)
        vectors = model.user_vectors(model.user_feats[split.val_rows],
                                     model.histories[split.val_rows])
        return retrieval_ndcg(vectors, model.item_vectors(), split.seen, split.val_rows,
                              split.relevant)

    return objective


def ranker_objective(X: np.ndarray, y: np.ndarray, groups: np.ndarray, base: Mapping[str, Any],
                     val_share: float = 0.2, seed: int = 0
                     ) -> Callable[[dict[str, Any]], float]:
    """A trial: fit the ranker on the groups outside a seeded ``val_share`` of them and score
    NDCG@10 of the held-out groups' ranked candidates (relevant = their positive rows).

    Rows must be sorted by group (``tandem.models.ranker.train_ranker``)."""
    from tandem.models import ranker as R

    keys = np.unique(groups)
    held = np.random.default_rng(seed).random(len(keys)) < val_share
    is_val = np.isin(groups, keys[held])
    relevant = pd.DataFrame({M.USER: groups[is_val & (y > 0)],
                             M.ITEM: np.flatnonzero(is_val & (y > 0))})

    def objective(params: dict[str, Any]) -> float:
        model = R.train_ranker(X[~is_val], y[~is_val], groups[~is_val], {**base, **params})
        pred = pd.DataFrame({M.USER: groups[is_val], M.ITEM: np.flatnonzero(is_val),
                             M.PREDICTION: R.predict(model, X[is_val])})
        return M.ndcg_at_k(relevant, pred, k=K)

    return objective


# ------------------------------------------------------------------------------ tuned.json

def read(bundle_dir: Path) -> dict[str, Any] | None:
    """The bundle's ``tuned.json``, or None when the night was not tuned."""
    path = Path(bundle_dir) / TUNED_PARAMS
    return json.loads(path.read_text()) if path.exists() else None


def tuned_params(bundle_dir: Path, model: str) -> dict[str, Any]:
    """The chosen parameters of ``model`` for this bundle ({} = use the defaults)."""
    doc = read(bundle_dir)
    return dict(((doc or {}).get("models", {}).get(model) or {}).get("params", {}))


def overlay(base: Mapping[str, Any], bundle_dir: Path, model: str,
            explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``base`` < the bundle's tuned ``model`` params < ``explicit`` (a caller's overrides)."""
    return {**base, **tuned_params(bundle_dir, model), **(explicit or {})}


def write(bundle_dir: Path, doc: Mapping[str, Any]) -> Path:
    """Write ``tuned.json`` into the bundle folder (overwrites)."""
    path = Path(bundle_dir) / TUNED_PARAMS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(doc), indent=2, sort_keys=True) + "\n")
    return path


def study_doc(results: Mapping[str, StudyResult], tuned_on: Mapping[str, Any],
              settings: TuningSettings) -> dict[str, Any]:
    return {"format": FORMAT, "source": "study", "reused_from": None, "tuned_on": dict(tuned_on),
            "settings": asdict(settings),
            "models": {m: asdict(r) for m, r in results.items()}}


def last_study(models_dir: Path, before: datetime, exclude: str) -> tuple[str, dict] | None:
    """(run id, tuned.json) of the latest earlier study (``tuned_on.end`` <= ``before``) among
    the bundles under ``models_dir``, skipping the run ``exclude``; reused copies point at
    theirs."""
    found = []
    for path in Path(models_dir).glob(f"*/{TUNED_PARAMS}"):
        doc = json.loads(path.read_text())
        if path.parent.name == exclude or doc.get("source") != "study":
            continue
        tuned_end = datetime.fromisoformat(doc["tuned_on"]["end"])
        if tuned_end <= before:
            found.append((tuned_end, path.parent.name, doc))
    if not found:
        return None
    _, run_id, doc = max(found, key=lambda f: (f[0], f[1]))
    return run_id, doc


def summary_tags(doc: Mapping[str, Any]) -> dict[str, str]:
    """Flat ``tandem.tuned.<model>.<param>`` tags (plus the source) of a ``tuned.json``."""
    tags = {"tandem.tuned.source": str(doc.get("source")),
            "tandem.tuned.reused_from": str(doc.get("reused_from") or "")}
    for model, result in doc.get("models", {}).items():
        tags.update({f"tandem.tuned.{model}.{k}": str(v)
                     for k, v in result.get("params", {}).items()})
        tags[f"tandem.tuned.{model}.{metric_key(METRIC)}"] = str(result.get("value"))
    return tags


def tune_ranker(bundle_dir: Path, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
                base: Mapping[str, Any], settings: TuningSettings | None = None
                ) -> dict[str, Any]:
    """The ranker's tuned parameters for this bundle, studied now if tonight is a study night.

    ``jobs/tune.py`` decided the night: no ``tuned.json`` -> {} (defaults); a reused choice ->
    its ranker params; a study without a ranker yet -> a study on the ranker's own training
    rows (groups = request users, all from the ranker's half: the evaluation's users are never
    seen), a seeded 20 % of the groups held out, recorded into ``tuned.json`` (a re-run finds
    it there and does not study again).
    """
    doc = read(bundle_dir)
    if doc is None:
        return {}
    if doc["source"] == "study" and RANKER not in doc["models"]:
        settings = settings or TuningSettings.from_env()
        with start_run("tune_ranker", {"rows": len(y), "groups": len(np.unique(groups))}) as job:
            result = run_study(RANKER, ranker_objective(X, y, groups, base, seed=settings.seed),
                               settings, job)
        write(bundle_dir, {**doc, "models": {**doc["models"], RANKER: asdict(result)}})
    return tuned_params(bundle_dir, RANKER)
