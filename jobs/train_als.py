"""Train implicit ALS on the lake's events of [start, end) and save the factors in the run's bundle.

extract: lake/events rows with ``start <= ts < end`` and arrival ``date >= day(start)`` (the
    window rule of ``tandem.lake``), the catalog (items created before ``end``) and profiles.
transform (Spark): per-event confidence with :func:`tandem.als.event_confidence` (the same
    function the offline evaluation uses, run through ``mapInPandas``), summed per (user, item),
    capped at ``max_confidence``; pairs with no confidence dropped.
load: the bundle's catalog order comes from ``tandem.catalog.load_or_write`` (this job runs first
    in the nightly chain, so it writes ``items.parquet``/``users.parquet``; a re-run reads them).
    The pairs go to the driver as a user x item CSR in that order, implicit ALS is fit, and the
    factors are written to ``<models>/<run_id>/als/{user_factors,item_factors}.npy``
    (``tandem.bundle.ALS_*``; row ``i`` = catalog row ``i``) with ``als/meta.json``. Pairs of
    items outside the catalog (unknown, or created after ``end``) are counted and dropped.

    python -m jobs.train_als --start 2026-01-01T00:00:00 --end 2026-01-02T00:00:00 --run-id 20260102
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from tandem import als as A
from tandem import schema as S
from tandem.bundle import ALS_ITEM_FACTORS, ALS_USER_FACTORS
from tandem.catalog import load_or_write, run_bundle_dir
from tandem.config import Paths
from tandem.job_cli import name_arg
from tandem.lake import day_of, epoch_ms
from tandem.spark.io import utc
from tandem.spark.session import get_spark


def extract(spark: SparkSession, paths: Paths, start: datetime, end: datetime) -> DataFrame:
    """Events with ``start <= ts < end`` (``ts`` epoch ms), only the columns ALS needs."""
    events = spark.read.parquet(str(paths.events))
    return (events.where(F.col(S.DATE) >= day_of(start))
            .where((F.col(S.TS) >= epoch_ms(start)) & (F.col(S.TS) < epoch_ms(end)))
            .select(S.USER_ID, S.ITEM_ID, S.EVENT_TYPE, S.DWELL_MS))


def extract_catalog(spark: SparkSession, paths: Paths, end: datetime, events: DataFrame
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(items created before ``end``, profiles, distinct (user, item) pairs of the window).

    The pairs are all ``tandem.catalog.load_or_write`` needs from the events (popularity =
    distinct users per item; users with events join the profiled ones).
    """
    items = (spark.read.parquet(str(paths.items)).where(F.col(S.CREATED_AT) < epoch_ms(end))
             .select(S.ITEM_ID, S.CREATED_AT).toPandas())
    users = spark.read.parquet(str(paths.users)).select(S.USER_ID).toPandas()
    pairs = events.select(S.USER_ID, S.ITEM_ID).distinct().toPandas()
    return items, users, pairs


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


def load(pairs: pd.DataFrame, catalog: pd.DataFrame, user_order: pd.DataFrame, bundle_dir: Path,
         cfg: dict[str, Any]) -> dict[str, int]:
    """Fit ALS on the pairs in the bundle's catalog order and write the factors (overwrites)."""
    item_ids = pd.Index(catalog[S.ITEM_ID].astype(str))
    user_ids = pd.Index(user_order[S.USER_ID].astype(str))
    matrix = A.confidence_matrix(pairs, user_ids, item_ids)
    factors = A.fit_als(matrix, user_ids, item_ids, cfg)
    for rel, array in ((ALS_USER_FACTORS, factors.user_factors),
                       (ALS_ITEM_FACTORS, factors.item_factors)):
        (bundle_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(bundle_dir / rel, array)
    unknown = item_ids.get_indexer(pd.Index(pd.unique(pairs[S.ITEM_ID]))) < 0
    counts = {"pairs": int(matrix.nnz), "users": len(user_ids), "items": len(item_ids),
              "unknown_items": int(unknown.sum())}
    model_cfg = {k: v for k, v in cfg.items() if k != "event_weights"}
    (bundle_dir / ALS_ITEM_FACTORS).with_name("meta.json").write_text(json.dumps(
        {**counts, "config": model_cfg, "event_weights": cfg["event_weights"]}, indent=2))
    return counts


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, int]:
    """Train on [start, end) and save into ``<models>/<run_id>``; returns counts.

    ``run_id`` defaults to the end date (YYYYMMDD, ``tandem.catalog.run_bundle_dir``).
    """
    cfg = {**A.ALS_CONFIG, **(cfg or {})}
    start, end = utc(start), utc(end)
    events = extract(spark, paths, start, end)
    bundle_dir = run_bundle_dir(paths, end, run_id)
    catalog, user_order = load_or_write(bundle_dir, *extract_catalog(spark, paths, end, events))
    pairs = transform(events, cfg).toPandas()
    return load(pairs, catalog, user_order, bundle_dir, cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train implicit ALS on lake events")
    parser.add_argument("--start", required=True, type=datetime.fromisoformat)
    parser.add_argument("--end", required=True, type=datetime.fromisoformat)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--master", default=None)
    parser.add_argument("--run-id", "--run", dest="run_id", type=name_arg, default=None,
                        help="bundle directory name under models/ (default: end date, YYYYMMDD)")
    args = parser.parse_args(argv)
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    spark = get_spark("tandem-train-als", master=args.master)
    try:
        print(json.dumps(run(spark, paths, args.start, args.end, run_id=args.run_id)))
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
