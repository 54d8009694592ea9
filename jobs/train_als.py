"""Train implicit ALS on the lake's events of [start, end) and save the factors.

extract: lake/events rows with ``start <= ts < end`` (partition-pruned by date).
transform (Spark): per-event confidence with :func:`tandem.als.event_confidence` (the same
    function the offline evaluation uses, run through ``mapInPandas``), summed per (user, item),
    capped at ``max_confidence``; pairs with no confidence dropped.
load: the pairs go to the driver as a user x item CSR (items in catalog order: ``lake/items``
    sorted by id, then unknown items seen in events), implicit ALS is fit, and the factors are
    written to ``<models>/<run>/als/`` (``user_factors.npy``, ``item_factors.npy``, ``ids.json``,
    ``meta.json``). ``run`` defaults to the interval end (``YYYYmmddTHHMMSS``), so a re-run of the
    same interval overwrites the same folder.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from tandem import als as A
from tandem import schema as S
from tandem.config import Paths
from tandem.spark.session import get_spark


def _ms(t: datetime) -> int:
    """Epoch ms of ``t`` (naive datetimes are UTC)."""
    stamp = pd.Timestamp(t)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp
    return stamp.value // 1_000_000


def extract(spark: SparkSession, paths: Paths, start: datetime, end: datetime) -> DataFrame:
    """Events with ``start <= ts < end`` (``ts`` epoch ms), only the columns ALS needs."""
    events = spark.read.parquet(str(paths.events))
    day_lo, day_hi = pd.Timestamp(start).strftime("%Y-%m-%d"), pd.Timestamp(end).strftime(
        "%Y-%m-%d")
    return (events.where((F.col(S.DATE) >= day_lo) & (F.col(S.DATE) <= day_hi))
            .where((F.col(S.TS) >= _ms(start)) & (F.col(S.TS) < _ms(end)))
            .select(S.USER_ID, S.ITEM_ID, S.EVENT_TYPE, S.DWELL_MS))


def transform(events: DataFrame, cfg: dict[str, Any]) -> DataFrame:
    """(user_id, item_id, confidence) per pair; the weights come from ``tandem.als``."""

    def weigh(batches):
        for pdf in batches:
            yield pdf[[S.USER_ID, S.ITEM_ID]].assign(confidence=A.event_confidence(pdf, cfg))

    weighted = events.mapInPandas(
        weigh, schema=f"{S.USER_ID} string, {S.ITEM_ID} string, confidence float")
    pairs = weighted.groupBy(S.USER_ID, S.ITEM_ID).agg(F.sum("confidence").alias("confidence"))
    return (pairs.withColumn("confidence", F.least(F.col("confidence"),
                                                   F.lit(float(cfg["max_confidence"]))))
            .where(F.col("confidence") > 0))


def load(pairs: pd.DataFrame, catalog_ids: pd.Series, out_dir: Path,
         cfg: dict[str, Any]) -> dict[str, int]:
    """Fit ALS on the pairs and write the factors to ``out_dir`` (overwrites)."""
    catalog = pd.Index(sorted(catalog_ids.astype(str).unique()))
    unknown = pd.Index(sorted(set(pairs[S.ITEM_ID]) - set(catalog)))
    item_ids = catalog.append(unknown)
    user_ids = pd.Index(sorted(pairs[S.USER_ID].unique()))
    matrix = A.confidence_matrix(pairs, user_ids, item_ids)
    factors = A.fit_als(matrix, user_ids, item_ids, cfg)
    factors.save(out_dir)
    counts = {"pairs": int(matrix.nnz), "users": len(user_ids), "items": len(item_ids),
              "unknown_items": len(unknown)}
    model_cfg = {k: v for k, v in cfg.items() if k != "event_weights"}
    (out_dir / "meta.json").write_text(json.dumps(
        {**counts, "config": model_cfg, "event_weights": cfg["event_weights"]}, indent=2))
    return counts


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: dict[str, Any] | None = None) -> dict[str, int]:
    """Train on [start, end) and save under ``<models>/<run>/als``; returns counts."""
    cfg = {**A.ALS_CONFIG, **(cfg or {})}
    run_name = cfg.get("run") or pd.Timestamp(end).strftime("%Y%m%dT%H%M%S")
    pairs = transform(extract(spark, paths, start, end), cfg).toPandas()
    items = (spark.read.parquet(str(paths.items)).select(S.ITEM_ID).toPandas()[S.ITEM_ID]
             if paths.items.exists() else pd.Series([], dtype=str))
    return load(pairs, items, paths.models / run_name / "als", cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train implicit ALS on lake events")
    parser.add_argument("--start", required=True, type=datetime.fromisoformat)
    parser.add_argument("--end", required=True, type=datetime.fromisoformat)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--master", default=None)
    parser.add_argument("--run", default=None, help="model folder name (default: interval end)")
    args = parser.parse_args(argv)
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    spark = get_spark("tandem-train-als", master=args.master)
    try:
        print(json.dumps(run(spark, paths, args.start, args.end, {"run": args.run})))
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
