"""Write the night's int-coded training table: the one input every learner of the run reads.

extract: lake events with ``start <= ts < end`` (the window rule of ``tandem.data.lake``: arrival
    ``date >= day(start)``), the catalog (items created before ``end``) and the user profiles.
transform (Spark, nothing collected to the driver):
    - ``users``: profiled users and users with events, sorted by id, dense ``user_idx``
      (ranked in the JVM from the sorted partitions, so indexes are contiguous across them);
    - ``items``: the catalog ordered by (created_at, item_id) with dense ``item_idx`` and
      ``popularity`` = distinct users per item in the window (``tandem.data.catalog``'s order);
    - ``interactions``: one row per (user, item) pair with any event in the window: ``weight``
      is the ALS confidence (``tandem.models.als.event_confidence`` per event through
      ``mapInPandas``, summed, capped at ``max_confidence``; 0 for impressions only),
      ``first_ts``/``ts`` the pair's first and last event, ``positive_ts`` its first positive
      engagement (``tandem.spark.events.is_positive``, null if none), ``engaged_ts`` its first
      engagement (any type but impression and dislike, null if none: what a query history holds, one
      definition for serving and training in ``tandem.features.query_history``). Events of items
      outside the catalog are dropped and counted;
    - ``cooc``: top-``cooc_top_k`` co-occurring items per item,
      ``|users with i and j| / sqrt(pop_i * pop_j)``
      (``tandem.features.ranking_features.cooccurrence``), from a self-join on user over each user's
      ``cooc_items_per_user`` most recent items (the bound that keeps the join linear in events).
load: ``lake/training/run_id=<run_id>/{users,items,interactions,cooc}`` (overwritten: a re-run
    of the run id rewrites the same table) -- layout in ``tandem.data.lake.TrainingTable`` -- and
    the bundle's ``items.parquet``/``users.parquet`` in index order (``tandem.data.catalog``), read
    back from the dictionaries with pyarrow.

Memory model at 5M users x 1M items x 50M events: Spark executors hold shuffle partitions only
(events ~40 B/row of the 4 columns read; the cooc self-join emits <= cooc_items_per_user rows per
user-item pair, 50M x 100 = 5G rows spread over the shuffle, which is the job's cost driver and
why the cap exists). The driver holds only the bundle's two dictionaries while writing them:
5M users x ~60 B + 1M items x ~80 B = ~0.4 GB, checked against ``TANDEM_DRIVER_BUDGET_MB``.

    spark-submit jobs/build_training_table.py --start 2026-01-01T00:00:00 \
        --end 2026-01-29T00:00:00 --run-id 20260129
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType

from tandem import schema as S
from tandem.config import Paths, within_driver_budget
from tandem.data import lake as L
from tandem.data.catalog import run_bundle_dir
from tandem.data.lake import day_of, epoch_ms
from tandem.features import query_history as QH
from tandem.models import als as A
from tandem.models.bundle import ITEMS, USERS
from tandem.ops.job_cli import name_arg
from tandem.spark.events import is_positive
from tandem.spark.io import utc
from tandem.spark.session import get_spark

log = logging.getLogger(__name__)

CONFIG: dict[str, Any] = {
    "als": A.ALS_CONFIG,  # event weights, dwell bonus and the pair cap of the ALS confidence
    "play_dwell_ms": 30_000,  # a play this long is a positive engagement (the two-tower's rule)
    "cooc_top_k": 100,  # co-occurring items kept per item (ranker/cooc.npz row length)
    "cooc_items_per_user": 200,  # a user's most recent items entering the cooc self-join
}
# driver-side bytes per dictionary row while writing the bundle's parquet (ids ~20 chars)
DICT_ROW_BYTES = 80


def extract(spark: SparkSession, paths: Paths, start: datetime, end: datetime) -> DataFrame:
    """Window events, only the columns the table needs."""
    events = spark.read.parquet(str(paths.events))
    return (events.where(F.col(S.DATE) >= day_of(start))
            .where((F.col(S.TS) >= epoch_ms(start)) & (F.col(S.TS) < epoch_ms(end)))
            .select(S.USER_ID, S.ITEM_ID, S.EVENT_TYPE, S.DWELL_MS, S.VALUE, S.TS))


def _dense_index(df: DataFrame, order: list[str], idx: str) -> DataFrame:
    """``df`` sorted by ``order`` (unique keys) with a dense int32 ``idx`` (0..n-1) in that order.

    Why not ``zipWithIndex``: it round-trips every row through Python workers. Here the range-
    partitioned sort tags each row with ``monotonically_increasing_id`` (partition index in the
    upper 31 bits, row within the partition in the lower 33), and a per-partition offset (the
    rows of the partitions before it: one tiny window over at most a few thousand counts,
    broadcast back) turns that into the global rank, all in the JVM. ``localCheckpoint`` pins the
    sorted partitions, so the counts and the ranks see the same split.
    """
    tagged = (df.orderBy(*order).withColumn("_pid", F.spark_partition_id())
              .withColumn("_row", F.monotonically_increasing_id().bitwiseAND((1 << 33) - 1))
              .localCheckpoint())
    counts = tagged.groupBy("_pid").count()
    offsets = counts.select("_pid", (F.sum("count").over(Window.orderBy("_pid"))
                                     - F.col("count")).alias("_off"))
    return (tagged.join(F.broadcast(offsets), "_pid")
            .select(*df.columns, (F.col("_off") + F.col("_row")).cast(IntegerType()).alias(idx)))


def dictionaries(spark: SparkSession, paths: Paths, end: datetime, events: DataFrame
                 ) -> tuple[DataFrame, DataFrame]:
    """(users: user_id, user_idx; items: item_id, item_idx, popularity, created_at)."""
    profiled = spark.read.parquet(str(paths.users)).select(S.USER_ID)
    user_ids = profiled.unionByName(events.select(S.USER_ID)).distinct()
    users = _dense_index(user_ids, [S.USER_ID], L.USER_IDX)
    catalog = (spark.read.parquet(str(paths.items)).where(F.col(S.CREATED_AT) < epoch_ms(end))
               .groupBy(S.ITEM_ID).agg(F.min(S.CREATED_AT).alias(S.CREATED_AT)))
    pop = (events.select(S.USER_ID, S.ITEM_ID).distinct().groupBy(S.ITEM_ID)
           .agg(F.count("*").cast("double").alias(L.POPULARITY)))
    items = _dense_index(catalog, [S.CREATED_AT, S.ITEM_ID], L.ITEM_IDX)
    items = (items.join(pop, S.ITEM_ID, "left").fillna(0.0, [L.POPULARITY])
             .select(S.ITEM_ID, L.ITEM_IDX, L.POPULARITY, S.CREATED_AT))
    return users, items


def interactions(events: DataFrame, users: DataFrame, items: DataFrame, cfg: dict[str, Any]
                 ) -> DataFrame:
    """One row per (user_idx, item_idx): capped ALS weight, first and last ts, first positive
    and first engaged ts."""
    als_cfg = cfg["als"]

    def weigh(batches):
        for pdf in batches:
            yield pdf[[S.USER_ID, S.ITEM_ID, S.TS]].assign(
                weight=A.event_confidence(pdf, als_cfg),
                positive=pdf["positive"].to_numpy(bool), engaged=pdf["engaged"].to_numpy(bool))

    flagged = (events.withColumn("positive", is_positive(cfg["play_dwell_ms"]))
               .withColumn("engaged", ~F.col(S.EVENT_TYPE).isin(sorted(QH.NOT_ENGAGEMENT))))
    weighted = flagged.mapInPandas(
        weigh, schema=f"{S.USER_ID} string, {S.ITEM_ID} string, {S.TS} long, weight float, "
                      "positive boolean, engaged boolean")
    pairs = weighted.groupBy(S.USER_ID, S.ITEM_ID).agg(
        F.least(F.sum("weight"), F.lit(float(als_cfg["max_confidence"]))).cast("float")
        .alias(L.WEIGHT),
        F.min(S.TS).alias(L.FIRST_TS), F.max(S.TS).alias(S.TS),
        F.min(F.when(F.col("positive"), F.col(S.TS))).alias(L.POSITIVE_TS),
        F.min(F.when(F.col("engaged"), F.col(S.TS))).alias(L.ENGAGED_TS))
    return (pairs.join(users, S.USER_ID).join(items.select(S.ITEM_ID, L.ITEM_IDX), S.ITEM_ID)
            .select(*L.INTERACTION_COLUMNS))


def cooccurrence(pairs: DataFrame, items: DataFrame, cfg: dict[str, Any]) -> DataFrame:
    """Top-``cooc_top_k`` (item_idx, other_idx, value) per item, value in (0, 1]."""
    recent = Window.partitionBy(L.USER_IDX).orderBy(F.col(S.TS).desc(), L.ITEM_IDX)
    bounded = (pairs.select(L.USER_IDX, L.ITEM_IDX, S.TS)
               .withColumn("rn", F.row_number().over(recent))
               .where(F.col("rn") <= cfg["cooc_items_per_user"]).select(L.USER_IDX, L.ITEM_IDX))
    a, b = bounded.alias("a"), bounded.alias("b")
    counts = (a.join(b, F.col(f"a.{L.USER_IDX}") == F.col(f"b.{L.USER_IDX}"))
              .where(F.col(f"a.{L.ITEM_IDX}") != F.col(f"b.{L.ITEM_IDX}"))
              .groupBy(F.col(f"a.{L.ITEM_IDX}").alias(L.ITEM_IDX),
                       F.col(f"b.{L.ITEM_IDX}").alias(L.OTHER_IDX))
              .agg(F.count("*").alias("n")))
    pop = items.select(L.ITEM_IDX, L.POPULARITY)
    pop_other = pop.select(F.col(L.ITEM_IDX).alias(L.OTHER_IDX),
                           F.col(L.POPULARITY).alias("pop_other"))
    scored = (counts.join(F.broadcast(pop), L.ITEM_IDX).join(F.broadcast(pop_other), L.OTHER_IDX)
              .withColumn(L.VALUE, (F.col("n") / F.sqrt(F.col(L.POPULARITY) * F.col("pop_other")))
                          .cast("float")))
    best = Window.partitionBy(L.ITEM_IDX).orderBy(F.col(L.VALUE).desc(), L.OTHER_IDX)
    return (scored.withColumn("rn", F.row_number().over(best))
            .where(F.col("rn") <= cfg["cooc_top_k"]).select(*L.COOC_COLUMNS))


def write_bundle_catalog(table: L.TrainingTable, bundle_dir, n_users: int, n_items: int) -> None:
    """The bundle's ``items.parquet``/``users.parquet`` (``tandem.data.catalog``) in index order."""
    within_driver_budget((n_users + n_items) * DICT_ROW_BYTES, "the bundle's id dictionaries")
    bundle_dir.mkdir(parents=True, exist_ok=True)
    items = table.items([S.ITEM_ID, L.ITEM_IDX, L.POPULARITY, S.CREATED_AT])
    items = items.take(pc.sort_indices(items[L.ITEM_IDX]))
    pq.write_table(items.select([S.ITEM_ID, L.POPULARITY, S.CREATED_AT]), bundle_dir / ITEMS)
    users = table.users([S.USER_ID, L.USER_IDX])
    users = users.take(pc.sort_indices(users[L.USER_IDX]))
    pq.write_table(users.select([S.USER_ID]), bundle_dir / USERS)


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, int]:
    """Build the table of [start, end) for ``run_id`` (default: end date, YYYYMMDD); counts."""
    cfg = {**CONFIG, **(cfg or {})}
    start, end = utc(start), utc(end)
    bundle_dir = run_bundle_dir(paths, end, run_id)
    table = L.TrainingTable(paths.training(bundle_dir.name))
    events = extract(spark, paths, start, end).cache()
    users, items = dictionaries(spark, paths, end, events)
    users.write.mode("overwrite").parquet(str(table.root / L.USERS_DIR))
    items.write.mode("overwrite").parquet(str(table.root / L.ITEMS_DIR))
    users = spark.read.parquet(str(table.root / L.USERS_DIR))  # cut the lineage: ids fixed now
    items = spark.read.parquet(str(table.root / L.ITEMS_DIR))
    pairs = interactions(events, users, items, cfg)
    pairs.write.mode("overwrite").parquet(str(table.root / L.INTERACTIONS_DIR))
    pairs = spark.read.parquet(str(table.root / L.INTERACTIONS_DIR))
    cooccurrence(pairs, items, cfg).write.mode("overwrite").parquet(
        str(table.root / L.COOC_DIR))
    known = items.select(S.ITEM_ID)
    counts = {"events": events.count(), "users": users.count(), "items": items.count(),
              "pairs": pairs.count(),
              "positive_pairs": pairs.where(F.col(L.POSITIVE_TS).isNotNull()).count(),
              "unknown_items": events.select(S.ITEM_ID).distinct()
              .join(known, S.ITEM_ID, "left_anti").count()}
    events.unpersist()
    write_bundle_catalog(table, bundle_dir, counts["users"], counts["items"])
    log.info("build_training_table %s: %s", table.root, counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", required=True, type=datetime.fromisoformat)
    parser.add_argument("--end", required=True, type=datetime.fromisoformat)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--master", default=None)
    parser.add_argument("--run-id", "--run", dest="run_id", type=name_arg, default=None,
                        help="bundle directory name under models/ (default: end date, YYYYMMDD)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    spark = get_spark("tandem-build-training-table", master=args.master)
    try:
        print(json.dumps(run(spark, paths, args.start, args.end, run_id=args.run_id)))
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
