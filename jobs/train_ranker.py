"""Train the LightGBM lambdarank ranker on the candidates retrieval really produces.

For the interval [start, end) with ``cut = end - label window`` (``label_days`` when set, else
``label_fraction`` of the interval):

extract: the window of ``tandem.lake.read_window`` (events of [start, end), items created
    before ``end``, profiles) with pyarrow -- it all goes to a single-machine learner anyway, so
    ``spark`` is unused (kept for the common job signature).
transform:
    1. the retrieval sources (ALS, two-tower, popularity; ``tandem.evaluation.fit_sources``) are
       fit on the events before ``cut`` -- two-tower only when the bundle has a two-tower part,
       so the ranker never learns from a source serving will not have. The bundle's own
       ALS/two-tower parts are NOT reused here: they were trained on the whole window, label
       period included, so their scores would leak the labels into the features;
    2. each user with a positive event in [cut, end) gets the union of the sources' top lists
       (``tandem.evaluation.candidates``: ALS top-200, two-tower top-500, popular fill), labelled
       1 when the user engaged positively with the item after ``cut``;
    3. entity features come through the feature store's point-in-time path:
       ``tandem.feature_store.training_frame`` joins the user/item/session rows as of
       ``event_timestamp = cut`` (the request time) and ``training_matrices`` turns them into the
       matrices of ``tandem.features``; retrieval, context and recency features are added by
       ``tandem.ranking_features.build_features`` -- the function serving calls.
       ``feature_source="history"`` computes the same raw rows from the events in-process (the
       offline evaluation's path). The default ``"feast"`` falls back to ``"history"`` with a
       warning when no Feast repo has been applied under ``TANDEM_HOME/feast``.
load, into the run's bundle ``<models>/<run_id>`` (``tandem.catalog.run_bundle_dir``):
    ``ranker/model.txt`` (LightGBM), ``ranker/cooc.npz`` (item co-occurrence over the whole
    window for the recency features, rows/columns in the bundle's catalog order of
    ``items.parquet``; serving rebuilds the ALS unit vectors from the bundle's ALS factors),
    ``features.json`` (ordered feature names + raw feature defaults) and ``ranker/meta.json``.

    python -m jobs.train_ranker --start 2026-01-01T00:00:00 --end 2026-01-02T00:00:00 \
        --run-id 20260102
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tandem import evaluation as E
from tandem import features as FT
from tandem import ranker as R
from tandem import ranking_features as RF
from tandem import schema as S
from tandem.bundle import FEATURE_SPEC, RANKER_COOC, RANKER_MODEL, TT_ITEM_VECTORS
from tandem.catalog import load_or_write, run_bundle_dir
from tandem.config import Paths
from tandem.dataset import Dataset, positives
from tandem.job_cli import name_arg
from tandem.lake import epoch_ms, read_window

log = logging.getLogger(__name__)

CONFIG: dict[str, Any] = {**E.EVAL_CONFIG, "label_days": None, "label_fraction": 0.2,
                          "feature_source": "feast"}


def label_cut(start: datetime, end: datetime, cfg: dict[str, Any]) -> datetime:
    """The request time: labels come from [cut, end), sources are fit on [start, cut)."""
    window = (timedelta(days=cfg["label_days"]) if cfg.get("label_days")
              else (end - start) * cfg["label_fraction"])
    return end - window


def feast_applied(paths: Paths) -> bool:
    """Whether ``tandem.feature_store.apply`` has registered a repo under ``paths.feast``."""
    return (paths.feast / "feature_store.yaml").exists() and (paths.feast / "registry.db").exists()


def training_set(data: Dataset, cut_ms: int, cfg: dict[str, Any], store=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, E.Fitted]:
    """(features [n, F], labels [n], group keys [n], fitted sources) for the ranker."""
    catalog = E.Catalog.of(data)
    history = data.events[data.events[S.TS] < cut_ms]
    after = data.events[data.events[S.TS] >= cut_ms]
    fitted = E.fit_sources(history, catalog, cfg)
    rel = E.relevant_pairs(after, cfg["play_dwell_ms"])
    users = pd.Index(pd.unique(rel[S.USER_ID]))
    users = users[catalog.user_ids.get_indexer(users) >= 0]
    req = E.Requests(catalog.user_ids.get_indexer(users), np.full(len(users), cut_ms, np.int64),
                     np.full(len(users), None, dtype=object))
    cands = E.candidates(fitted, req.user_rows, cfg)
    keys = pd.MultiIndex.from_arrays([catalog.user_ids.get_indexer(rel[S.USER_ID]),
                                      catalog.item_ids.get_indexer(rel[S.ITEM_ID])])
    labels = pd.MultiIndex.from_arrays([cands["user_row"], cands["item"]]).isin(keys)
    if cfg["feature_source"] == "history":
        X = E.feature_matrix(fitted, catalog, req, cands, cfg)
    else:
        X = _features_from_store(store, fitted, catalog, req, cands)
    return X, labels.astype(np.int32), cands["user_row"].to_numpy(), fitted


def _features_from_store(store, fitted: E.Fitted, catalog: E.Catalog, req: E.Requests,
                         cands: pd.DataFrame) -> np.ndarray:
    """Entity features through Feast's point-in-time join, one entity row per candidate."""
    from tandem.feature_store import training_frame, training_matrices

    local = pd.Index(req.user_rows).get_indexer(cands["user_row"])
    entity_df = pd.DataFrame({
        S.USER_ID: catalog.user_ids[cands["user_row"].to_numpy()],
        S.ITEM_ID: catalog.item_ids[cands["item"].to_numpy()],
        S.EVENT_TIMESTAMP: pd.to_datetime(req.now_ms[local], unit="ms", utc=True)})
    users, items, session = training_matrices(training_frame(store, entity_df))
    _, recent = E.session_rows(fitted.history, catalog, req.user_rows, RF.N_RECENT)
    sources = {c: cands[c].to_numpy(np.float32) for c in cands.columns
               if c.endswith(("_score", "_rank"))}
    hour = ((req.now_ms[local] // 3_600_000) % 24).astype(np.float32)
    rows = np.arange(len(cands))
    return RF.build_features(rows, cands["item"].to_numpy(), sources, users, items, session,
                             hour, RF.device_codes(req.device[local]), recent[local],
                             fitted.space)


def bundle_cooc(events: pd.DataFrame, catalog: pd.DataFrame, user_order: pd.DataFrame
                ) -> sp.csr_matrix:
    """``ranking_features.cooccurrence`` of the whole window, in the bundle's catalog order.

    Built from every event (impressions included), exactly as ``evaluation.fit_sources`` builds
    the training-time matrix; events of items outside the catalog are dropped.
    """
    item_ids = pd.Index(catalog[S.ITEM_ID].astype(str))
    user_ids = pd.Index(user_order[S.USER_ID].astype(str))
    rows = user_ids.get_indexer(events[S.USER_ID].astype(str))
    cols = item_ids.get_indexer(events[S.ITEM_ID].astype(str))
    keep = (rows >= 0) & (cols >= 0)
    seen = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (rows[keep], cols[keep])),
                         shape=(len(user_ids), len(item_ids)))
    return RF.cooccurrence(seen)


def feature_spec() -> dict[str, Any]:
    """``features.json``: the ranker's input columns in order and the raw fields' defaults."""
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in FT.DEFAULTS.items()}
    return {"names": list(RF.FEATURE_NAMES), "defaults": defaults}


def load(model, cooc: sp.csr_matrix, bundle_dir: Path, counts: dict[str, Any]) -> None:
    """Write the model, the co-occurrence matrix, the feature spec and counts (overwrites)."""
    R.save(model, bundle_dir / RANKER_MODEL)
    sp.save_npz(bundle_dir / RANKER_COOC, cooc.tocsr())
    (bundle_dir / FEATURE_SPEC).write_text(json.dumps(feature_spec(), indent=2))
    (bundle_dir / RANKER_MODEL).with_name("meta.json").write_text(json.dumps(counts, indent=2))


def _store_for(paths: Paths, cfg: dict[str, Any], store):
    """(feature source actually used, store): ``feast`` needs an applied repo, else history."""
    if cfg["feature_source"] != "feast" or store is not None:
        return cfg["feature_source"], store
    if not feast_applied(paths):
        log.warning("no Feast repo applied under %s: ranker features come from the event "
                    "history instead (feature_source=history)", paths.feast)
        return "history", None
    from tandem.feature_store import open_store

    return "feast", open_store(paths)


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        store=None, run_id: str | None = None) -> dict[str, Any]:
    """Train on [start, end) (labels from the window's tail) into the run's bundle.

    ``spark`` is unused (common job signature). Returns row/group/label counts and the feature
    source used. Deterministic for a given lake, interval and ``cfg``; re-runs overwrite.
    """
    cfg = {**CONFIG, **(cfg or {})}
    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))
    source, store = _store_for(paths, cfg, store)
    cfg["feature_source"] = source
    cut_ms = epoch_ms(label_cut(start, end, cfg))
    data = read_window(paths, start, end)
    bundle_dir = run_bundle_dir(paths, end, run_id)
    catalog, user_order = load_or_write(bundle_dir, data.items, data.users, data.events)
    if not (bundle_dir / TT_ITEM_VECTORS).exists():
        cfg["two_tower"] = None  # serve-time features must match: no two-tower, no such source
    X, y, groups, fitted = training_set(data, cut_ms, cfg, store)
    keep = pd.Series(y).groupby(groups).transform("max").to_numpy() > 0
    keep &= R.sample_negatives(y, cfg["ranker_negative_rate"], cfg["ranker"]["random_state"])
    if not keep.any():
        raise ValueError(f"no positive labels in [{pd.Timestamp(cut_ms, unit='ms')}, {end}): "
                         "the ranker has nothing to learn from")
    model = R.train_ranker(X[keep], y[keep], groups[keep], cfg["ranker"])
    after = data.events[data.events[S.TS] >= cut_ms]
    counts = {"rows": int(keep.sum()), "groups": int(len(np.unique(groups[keep]))),
              "positives": int(y[keep].sum()), "history_events": int(len(fitted.history)),
              "label_events": int(len(after)),
              "positive_label_events": int(positives(after, cfg["play_dwell_ms"]).sum()),
              "feature_source": source, "bundle_dir": str(bundle_dir)}
    load(model, bundle_cooc(data.events, catalog, user_order), bundle_dir, counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the LightGBM ranker on lake events")
    parser.add_argument("--start", required=True, type=datetime.fromisoformat)
    parser.add_argument("--end", required=True, type=datetime.fromisoformat)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--master", default=None, help="accepted for uniformity; no Spark is used")
    parser.add_argument("--run-id", "--run", dest="run_id", type=name_arg, default=None,
                        help="bundle directory name under models/ (default: end date, YYYYMMDD)")
    parser.add_argument("--feature-source", choices=("feast", "history"), default="feast")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    print(json.dumps(run(None, paths, args.start, args.end,
                         {"feature_source": args.feature_source}, run_id=args.run_id)))


if __name__ == "__main__":
    main()
