"""Batch entity features for Feast: user profile/activity and item content/popularity snapshots.

A snapshot at time ``T`` describes events with ``ts < T`` only: engagement counts over the 1h,
24h and 7d before ``T`` and over ``lookback_days``, positives, smoothed mean ratings, genre
affinity, smoothed CTR, last-event times. Every known user (lake/users or events) and item
(lake/items or events) gets one row per snapshot with ``event_timestamp = T``, written to
``lake/features/{user,item}/date=<UTC date of T - 1 ms>/`` (the day the snapshot closes).

Snapshots are taken at ``end, end - 1 day, end - 2 days, ...`` while after ``start``: a daily
run writes one snapshot (at ``end``); a backfill over a range writes one per day in one pass
(the MovieLens demo builds its whole history this way). Pure function of the events before
``end`` and the config; dynamic partition overwrite makes re-runs idempotent.

"Engagement" is every event but an impression; "positive" is a positive event type, a rating
``>= POSITIVE_RATING`` or a play with ``dwell_ms >= positive_dwell_ms``. MovieLens has no
impressions, so its CTR is the prior and its popularity counts ratings.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from tandem import features as feat
from tandem import schema as s
from tandem.config import Paths

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
CONFIG: dict[str, Any] = {
    "lookback_days": 365,  # totals and last-event times look this far back from a snapshot
    "positive_dwell_ms": 30_000,  # a play at least this long is a positive
    "ctr_prior_a": feat.CTR_PRIOR_A,  # smoothed CTR = (clicks + a) / (impressions + a + b)
    "ctr_prior_b": feat.CTR_PRIOR_B,
    "rating_prior": feat.DEFAULT_RATING,  # mean = (sum + w * prior) / (n + w)
    "rating_prior_weight": feat.RATING_PRIOR_WEIGHT,
}
WINDOWS = {"1h": HOUR_MS, "24h": DAY_MS, "7d": 7 * DAY_MS}


def snapshot_times(start: datetime, end: datetime) -> list[datetime]:
    """``end - k days`` for k = 0, 1, ... while after ``start`` (oldest first; at least end)."""
    times, t = [], end
    while t > start or not times:
        times.append(t)
        t -= timedelta(days=1)
    return times[::-1]


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


# --------------------------------------------------------------------------------------- extract

def extract(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
            lookback_days: int) -> tuple[DataFrame, DataFrame, DataFrame]:
    """Events in ``[first snapshot - lookback, end)``, items and users."""
    first = snapshot_times(start, end)[0] - timedelta(days=lookback_days)
    events = (spark.read.parquet(str(paths.events))
              .where(F.col(s.DATE).between(first.strftime("%Y-%m-%d"), end.strftime("%Y-%m-%d")))
              .where((F.col(s.TS) >= _ms(first)) & (F.col(s.TS) < _ms(end))))
    items = spark.read.parquet(str(paths.items))
    users = spark.read.parquet(str(paths.users))
    return events, items, users


# ------------------------------------------------------------------------------------- transform

def _hourly(events: DataFrame, key: str, cfg: dict[str, Any]) -> DataFrame:
    """Per (entity, hour) sums: engagements, positives, ratings, impressions, clicks, last ts."""
    etype = F.col(s.EVENT_TYPE)
    positive = (etype.isin(*s.POSITIVE_EVENT_TYPES)
                | ((etype == s.RATING) & (F.col(s.VALUE) >= s.POSITIVE_RATING))
                | ((etype == s.PLAY) & (F.col(s.DWELL_MS) >= cfg["positive_dwell_ms"])))
    is_rating = (etype == s.RATING) & F.col(s.VALUE).isNotNull()
    engaged = etype != s.IMPRESSION
    return (events
            .withColumn("hour_ms", F.floor(F.col(s.TS) / HOUR_MS) * HOUR_MS)
            .groupBy(key, "hour_ms")
            .agg(F.sum(engaged.cast("long")).alias("n_eng"),
                 F.sum(positive.cast("long")).alias("n_pos"),
                 F.sum(is_rating.cast("long")).alias("n_rat"),
                 F.sum(F.when(is_rating, F.col(s.VALUE)).otherwise(0.0)).alias("sum_rat"),
                 F.sum((etype == s.IMPRESSION).cast("long")).alias("n_imp"),
                 F.sum((etype == s.CLICK).cast("long")).alias("n_click"),
                 F.max(F.when(engaged, F.col(s.TS))).alias("last_ts")))


def _windowed(hourly: DataFrame, snaps: DataFrame, key: str, lookback_ms: int) -> DataFrame:
    """Per (entity, snapshot) window sums over the hourly rows before the snapshot."""
    joined = hourly.join(F.broadcast(snaps), (F.col("hour_ms") < F.col("snap_ms"))
                         & (F.col("hour_ms") >= F.col("snap_ms") - lookback_ms))

    def within(col: str, span_ms: int):
        return F.sum(F.when(F.col("hour_ms") >= F.col("snap_ms") - span_ms, F.col(col))
                     .otherwise(0))

    return (joined.groupBy(key, "snap_ms")
            .agg(*(within("n_eng", ms).alias(f"eng_{w}") for w, ms in WINDOWS.items()),
                 F.sum("n_eng").alias("eng_total"),
                 within("n_pos", WINDOWS["7d"]).alias("pos_7d"),
                 within("n_imp", WINDOWS["7d"]).alias("imp_7d"),
                 within("n_click", WINDOWS["7d"]).alias("click_7d"),
                 F.sum("n_rat").alias("n_rat"), F.sum("sum_rat").alias("sum_rat"),
                 F.max("last_ts").alias("last_ts")))


def _genre_affinity(events: DataFrame, items: DataFrame, snaps: DataFrame, positive_dwell_ms,
                    lookback_ms: int) -> DataFrame:
    """Per (user, snapshot): share of positives per genre of ``GENRE_VOCAB`` (array, sums to 1).

    Each positive spreads weight 1 evenly over its item's in-vocabulary genres.
    """
    vocab = F.array(*(F.lit(g) for g in feat.GENRE_VOCAB))
    etype = F.col(s.EVENT_TYPE)
    positive = (etype.isin(*s.POSITIVE_EVENT_TYPES)
                | ((etype == s.RATING) & (F.col(s.VALUE) >= s.POSITIVE_RATING))
                | ((etype == s.PLAY) & (F.col(s.DWELL_MS) >= positive_dwell_ms)))
    item_genres = (items.select(s.ITEM_ID, F.explode(F.array_intersect(s.GENRES, vocab))
                                .alias("genre"))
                   .withColumn("g_idx", (F.array_position(vocab, F.col("genre")) - 1).cast("int"))
                   .withColumn("w", 1.0 / F.count("*").over(Window.partitionBy(s.ITEM_ID))))
    pos = (events.where(positive).select(s.USER_ID, s.ITEM_ID, s.TS)
           .join(item_genres, s.ITEM_ID)
           .join(F.broadcast(snaps), (F.col(s.TS) < F.col("snap_ms"))
                 & (F.col(s.TS) >= F.col("snap_ms") - lookback_ms))
           .groupBy(s.USER_ID, "snap_ms", "g_idx").agg(F.sum("w").alias("w")))
    total = F.sum("w").over(Window.partitionBy(s.USER_ID, "snap_ms"))
    slots = (pos.withColumn("share", F.col("w") / total)
             .groupBy(s.USER_ID, "snap_ms")
             .agg(F.map_from_entries(F.collect_list(F.struct("g_idx", "share"))).alias("m")))
    return slots.select(s.USER_ID, "snap_ms", F.array(*(
        F.coalesce(F.col("m")[i], F.lit(0.0)).cast("float") for i in range(feat.N_GENRES)))
        .alias("user_genre_affinity"))


def _smoothed_mean(cfg: dict[str, Any]):
    w, prior = cfg["rating_prior_weight"], cfg["rating_prior"]
    return ((F.coalesce(F.col("sum_rat"), F.lit(0.0)) + w * prior)
            / (F.coalesce(F.col("n_rat"), F.lit(0)) + w)).cast("float")


def _grid(ids: DataFrame, snaps: DataFrame, key: str) -> DataFrame:
    return ids.select(key).distinct().crossJoin(F.broadcast(snaps))


def _finish(frame: DataFrame) -> DataFrame:
    """Add ``event_timestamp`` and the ``date`` partition (UTC date of T - 1 ms)."""
    ts = F.timestamp_millis(F.col("snap_ms"))
    return (frame.withColumn(s.EVENT_TIMESTAMP, ts)
            .withColumn(s.DATE, F.date_format(F.timestamp_millis(F.col("snap_ms") - 1),
                                              "yyyy-MM-dd"))
            .drop("snap_ms"))


def _counts(prefix: str, names: dict[str, str]):
    return [F.coalesce(F.col(src), F.lit(0)).cast("long").alias(f"{prefix}{dst}")
            for src, dst in names.items()]


def user_features(events: DataFrame, items: DataFrame, users: DataFrame, snaps: DataFrame,
                  cfg: dict[str, Any]) -> DataFrame:
    """One row per (user, snapshot) with ``USER_FIELDS`` (+ user_id, event_timestamp, date)."""
    lookback = cfg["lookback_days"] * DAY_MS
    win = _windowed(_hourly(events, s.USER_ID, cfg), snaps, s.USER_ID, lookback)
    aff = _genre_affinity(events, items, snaps, cfg["positive_dwell_ms"], lookback)
    ids = users.select(s.USER_ID).unionByName(events.select(s.USER_ID))
    zeros = F.array(*(F.lit(0.0).cast("float") for _ in range(feat.N_GENRES)))
    frame = (_grid(ids, snaps, s.USER_ID)
             .join(users, s.USER_ID, "left").join(win, [s.USER_ID, "snap_ms"], "left")
             .join(aff, [s.USER_ID, "snap_ms"], "left")
             .select(s.USER_ID, "snap_ms",
                     F.coalesce(F.col(s.AGE_BUCKET), F.lit("")).alias("user_age_bucket"),
                     F.coalesce(F.col(s.GENDER), F.lit("")).alias("user_gender"),
                     F.coalesce(F.col(s.SIGNUP_TS), F.lit(0)).cast("long").alias("user_signup_ts"),
                     _smoothed_mean(cfg).alias("user_avg_rating"),
                     F.coalesce(F.col("n_rat"), F.lit(0)).cast("long").alias("user_ratings_total"),
                     F.coalesce(F.col("user_genre_affinity"), zeros).alias("user_genre_affinity"),
                     *_counts("user_events_", {"eng_1h": "1h", "eng_24h": "24h", "eng_7d": "7d",
                                               "eng_total": "total"}),
                     F.coalesce(F.col("pos_7d"), F.lit(0)).cast("long").alias("user_positives_7d"),
                     F.coalesce(F.col("last_ts"), F.lit(0)).cast("long")
                     .alias("user_last_event_ts")))
    return _finish(frame)


def item_features(events: DataFrame, items: DataFrame, snaps: DataFrame,
                  cfg: dict[str, Any]) -> DataFrame:
    """One row per (item, snapshot) with ``ITEM_FIELDS`` (+ item_id, event_timestamp, date)."""
    lookback = cfg["lookback_days"] * DAY_MS
    win = _windowed(_hourly(events, s.ITEM_ID, cfg), snaps, s.ITEM_ID, lookback)
    ids = items.select(s.ITEM_ID).unionByName(events.select(s.ITEM_ID))
    a, b = cfg["ctr_prior_a"], cfg["ctr_prior_b"]
    clicks, imps = F.coalesce(F.col("click_7d"), F.lit(0)), F.coalesce(F.col("imp_7d"), F.lit(0))
    frame = (_grid(ids, snaps, s.ITEM_ID)
             .join(items, s.ITEM_ID, "left").join(win, [s.ITEM_ID, "snap_ms"], "left")
             .select(s.ITEM_ID, "snap_ms",
                     F.coalesce(F.col(s.GENRES), F.array().cast("array<string>"))
                     .alias("item_genres"),
                     F.coalesce(F.col(s.RELEASE_YEAR), F.lit(0)).cast("long")
                     .alias("item_release_year"),
                     F.coalesce(F.col(s.DURATION_S), F.lit(0)).cast("long")
                     .alias("item_duration_s"),
                     F.coalesce(F.col(s.CREATED_AT), F.lit(0)).cast("long")
                     .alias("item_created_at"),
                     *_counts("item_pop_", {"eng_1h": "1h", "eng_24h": "24h", "eng_7d": "7d",
                                            "eng_total": "total"}),
                     imps.cast("long").alias("item_impressions_7d"),
                     clicks.cast("long").alias("item_clicks_7d"),
                     ((clicks + a) / (imps + a + b)).cast("float").alias("item_ctr"),
                     _smoothed_mean(cfg).alias("item_avg_rating"),
                     F.coalesce(F.col("n_rat"), F.lit(0)).cast("long").alias("item_ratings_total"),
                     F.coalesce(F.col("last_ts"), F.lit(0)).cast("long")
                     .alias("item_last_event_ts")))
    return _finish(frame)


# ------------------------------------------------------------------------------------------ load

def load(frame: DataFrame, out: Path) -> int:
    """Overwrite the frame's date partitions under ``out``; returns the rows written."""
    frame = frame.cache()
    n = frame.count()
    frame.repartition(s.DATE).write.mode("overwrite").partitionBy(s.DATE).parquet(str(out))
    frame.unpersist()
    return n


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: dict[str, Any] | None = None) -> dict[str, int]:
    """Build the user and item snapshots for ``(start, end]``; returns row counts.

    ``end`` must be on a whole hour (windows are summed from hourly buckets).
    """
    cfg = {**CONFIG, **(cfg or {})}
    # UTC-adjusted int64 micros (readers see tz-aware UTC), not Spark's legacy naive INT96
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))
    if _ms(end) % HOUR_MS:
        raise ValueError(f"end must be on a whole hour, got {end.isoformat()}")
    times = snapshot_times(start, end)
    snaps = spark.createDataFrame([(_ms(t),) for t in times],
                                  T.StructType([T.StructField("snap_ms", T.LongType())]))
    events, items, users = extract(spark, paths, start, end, cfg["lookback_days"])
    # both feature tables read the events five times: scan the lake's files once
    events = events.select(s.USER_ID, s.ITEM_ID, s.TS, s.EVENT_TYPE, s.VALUE, s.DWELL_MS).cache()
    counts = {"snapshots": len(times),
              "user_rows": load(user_features(events, items, users, snaps, cfg),
                                paths.user_features),
              "item_rows": load(item_features(events, items, snaps, cfg), paths.item_features)}
    events.unpersist()
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", required=True, type=datetime.fromisoformat)
    ap.add_argument("--end", required=True, type=datetime.fromisoformat)
    ap.add_argument("--home", type=Path, default=None, help="state root (default TANDEM_HOME)")
    ap.add_argument("--master", default=None, help="Spark master (default SPARK_MASTER)")
    args = ap.parse_args(argv)
    from tandem.spark.session import get_spark

    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    print(json.dumps(run(get_spark("build_features", master=args.master), paths, args.start,
                         args.end)))


if __name__ == "__main__":
    main()
