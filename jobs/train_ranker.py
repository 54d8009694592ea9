"""Train the LightGBM lambdarank ranker on the candidates retrieval really produces.

For the interval [start, end) with ``cut = end - label_days``:

extract: lake events with ``start <= ts < end``, the catalog (lake/items) and profiles
    (lake/users), as pandas (they go to a single-machine learner anyway).
transform:
    1. the retrieval sources (ALS, two-tower, popularity; ``tandem.evaluation.fit_sources``) are
       fit on the events before ``cut``;
    2. each user with a positive event in [cut, end) gets the union of the sources' top lists
       (``tandem.evaluation.candidates``: ALS top-200, two-tower top-500, popular fill), labelled
       1 when the user engaged positively with the item after ``cut``;
    3. entity features come through the feature store's point-in-time path:
       ``tandem.feature_store.training_frame`` joins the user/item/session rows as of
       ``event_timestamp = cut`` (the request time) and ``training_matrices`` turns them into the
       matrices of ``tandem.features``; retrieval, context and recency features are added by
       ``tandem.ranking_features.build_features`` -- the function serving calls.
       ``feature_source="history"`` computes the same raw rows from the events in-process (the
       offline evaluation's path) for a lake without a Feast repo.
load: ``<models>/<run>/ranker/``: ``model.txt`` (LightGBM), ``feature_names.json``,
    ``cooc.npz`` (item co-occurrence for the recency features, bundle path ``ranker/cooc.npz``),
    ``item_ids.json`` (its row order) and ``meta.json``.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from tandem import evaluation as E
from tandem import ranker as R
from tandem import ranking_features as RF
from tandem import schema as S
from tandem.config import Paths
from tandem.dataset import EVENT_COLUMNS, Dataset, conform, positives
from tandem.spark.session import get_spark

CONFIG: dict[str, Any] = {**E.EVAL_CONFIG, "label_days": 7, "feature_source": "feast"}


def _ms(t: datetime) -> int:
    """Epoch ms of ``t`` (naive datetimes are UTC)."""
    stamp = pd.Timestamp(t)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp
    return stamp.value // 1_000_000


def extract(spark: SparkSession, paths: Paths, start: datetime, end: datetime) -> Dataset:
    """Events of [start, end) plus the catalog and profiles, as a :class:`Dataset`."""
    day_lo, day_hi = (pd.Timestamp(t).strftime("%Y-%m-%d") for t in (start, end))
    events = (spark.read.parquet(str(paths.events))
              .where((F.col(S.DATE) >= day_lo) & (F.col(S.DATE) <= day_hi))
              .where((F.col(S.TS) >= _ms(start)) & (F.col(S.TS) < _ms(end)))
              .drop(S.DATE, S.HOUR).toPandas())
    items = spark.read.parquet(str(paths.items)).toPandas().sort_values(S.ITEM_ID)
    users = spark.read.parquet(str(paths.users)).toPandas()
    return Dataset(conform(events, EVENT_COLUMNS), items.reset_index(drop=True), users, "lake")


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


def load(model, fitted: E.Fitted, out_dir: Path, counts: dict[str, Any]) -> None:
    """Write the model and the artifacts serving needs next to it (overwrites).

    ``cooc.npz`` (scipy sparse) is the bundle's ``ranker/cooc.npz`` that serving loads for the
    recency features; its rows/columns follow ``item_ids.json``. Serving rebuilds the ALS unit
    vectors from the bundle's own ALS factors.
    """
    R.save(model, out_dir / "model.txt")
    (out_dir / "feature_names.json").write_text(json.dumps(list(RF.FEATURE_NAMES)))
    sp.save_npz(out_dir / "cooc.npz", fitted.space.cooc.tocsr())
    (out_dir / "item_ids.json").write_text(json.dumps([str(i) for i in fitted.als.item_ids]))
    (out_dir / "meta.json").write_text(json.dumps(counts, indent=2))


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: dict[str, Any] | None = None, store=None) -> dict[str, Any]:
    """Train on [start, end) (labels from the last ``label_days``); returns counts."""
    cfg = {**CONFIG, **(cfg or {})}
    run_name = cfg.get("run") or pd.Timestamp(end).strftime("%Y%m%dT%H%M%S")
    cut_ms = _ms(end - timedelta(days=cfg["label_days"]))
    data = extract(spark, paths, start, end)
    if cfg["feature_source"] == "feast" and store is None:
        from tandem.feature_store import open_store
        store = open_store(paths)
    X, y, groups, fitted = training_set(data, cut_ms, cfg, store)
    keep = pd.Series(y).groupby(groups).transform("max").to_numpy() > 0
    keep &= R.sample_negatives(y, cfg["ranker_negative_rate"], cfg["ranker"]["random_state"])
    model = R.train_ranker(X[keep], y[keep], groups[keep], cfg["ranker"])
    counts = {"rows": int(keep.sum()), "groups": int(len(np.unique(groups[keep]))),
              "positives": int(y[keep].sum()), "history_events": int(len(fitted.history)),
              "label_events": int((data.events[S.TS] >= cut_ms).sum()),
              "positive_label_events": int(positives(data.events[data.events[S.TS] >= cut_ms],
                                                     cfg["play_dwell_ms"]).sum()),
              "feature_source": cfg["feature_source"]}
    load(model, fitted, paths.models / run_name / "ranker", counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the LightGBM ranker on lake events")
    parser.add_argument("--start", required=True, type=datetime.fromisoformat)
    parser.add_argument("--end", required=True, type=datetime.fromisoformat)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--master", default=None)
    parser.add_argument("--run", default=None, help="model folder name (default: interval end)")
    parser.add_argument("--feature-source", choices=("feast", "history"), default="feast")
    args = parser.parse_args(argv)
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    spark = get_spark("tandem-train-ranker", master=args.master)
    try:
        print(json.dumps(run(spark, paths, args.start, args.end,
                             {"run": args.run, "feature_source": args.feature_source})))
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
