"""Batch entity features for Feast: user profile/activity and item content/popularity snapshots.

A snapshot at time ``T`` describes events with ``ts < T`` only: engagement counts over the 1h,
24h and 7d before ``T`` and over ``lookback_days``, positives, smoothed mean ratings, genre
affinity, smoothed CTR, last-event times. Every known user (lake/users or events) and item
(lake/items or events) gets one row per snapshot with ``event_timestamp = T``, written to
``lake/features/{user,item}/date=<UTC date of T - 1 ms>/`` (the day the snapshot closes).

Snapshots are taken at ``end, end - 1 day, end - 2 days, ...`` while after ``start``: a daily
run writes one snapshot (at ``end``); a backfill over a range writes one per day in one pass
(the MovieLens demo builds its whole history this way). Pure function of the events before
``end`` and the config; the snapshot days' partitions are replaced atomically (``tandem.spark.io``).

Incremental: the windows are sums of per (entity, event hour) partials (engagements, positives,
ratings, impressions, clicks, last event time, a user's positive weight per genre) kept in
``lake/features/partials/{user,item}/date=/hour=``. A run computes the partials of its own hours
(``[start - lateness, end)``, by event time; an event arriving later than ``lateness`` after its
hour is counted only by a backfill over its hour) and of any earlier hour inside the lookback
that has none yet (a fresh lake, a backfill), writes them once, and reads the others. An hourly
run therefore reads two hours of events, not ``lookback_days`` of them.

Memory model (platform: 5M users, 1M items, 50M events/day): the events read are the run's
hours (~2.1M an hour, ~60 B of the six columns used); partials hold one row per active
(entity, hour) (<= the hour's events, ~70 B, a user row +18 doubles), so the windows read
``lookback`` of partials (~1/3 of the events' rows at 5 events per active user-hour) and sum
them per (entity, snapshot) in one shuffle. The snapshot grid is every known entity x snapshot
(6M rows, ~200 B each, ~1.2 GB written an hour), the one output that grows with the catalog and
audience rather than with the interval. Nothing is collected to the driver but the partials'
folder listing and counts.

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
from tandem.spark.events import read_events
from tandem.spark.io import (
    DAY,
    HOUR,
    delete,
    list_names,
    overwrite_interval,
    read_table,
    touch,
    utc,
    with_partitions,
)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
CONFIG: dict[str, Any] = {
    "lookback_days": 365,  # totals and last-event times look this far back from a snapshot
    "lateness_hours": 1,  # partials of the hours this long before start are recomputed
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


# -------------------------------------------------------------------------------------- partials

GENRE_W = "genre_w"  # a user partial's positive weight per GENRE_VOCAB genre (array<double>)
_SUMS = (("n_eng", T.LongType()), ("n_pos", T.LongType()), ("n_rat", T.LongType()),
         ("sum_rat", T.DoubleType()), ("n_imp", T.LongType()), ("n_click", T.LongType()),
         ("last_ts", T.LongType()))


def partials_schema(key: str) -> T.StructType:
    """lake/features/partials/<entity>: key, hour_ms, the sums (users: + genre_w), date, hour."""
    fields = [T.StructField(key, T.StringType()), T.StructField("hour_ms", T.LongType()),
              *(T.StructField(n, t) for n, t in _SUMS)]
    if key == s.USER_ID:
        fields.append(T.StructField(GENRE_W, T.ArrayType(T.DoubleType())))
    return with_partitions(T.StructType(fields))


def _positive(cfg: dict[str, Any]):
    etype = F.col(s.EVENT_TYPE)
    return (etype.isin(*s.POSITIVE_EVENT_TYPES)
            | ((etype == s.RATING) & (F.col(s.VALUE) >= s.POSITIVE_RATING))
            | ((etype == s.PLAY) & (F.col(s.DWELL_MS) >= cfg["positive_dwell_ms"])))


def _hourly(events: DataFrame, key: str, cfg: dict[str, Any]) -> DataFrame:
    """Per (entity, hour) sums: engagements, positives, ratings, impressions, clicks, last ts."""
    etype = F.col(s.EVENT_TYPE)
    is_rating = (etype == s.RATING) & F.col(s.VALUE).isNotNull()
    engaged = etype != s.IMPRESSION
    return (events
            .withColumn("hour_ms", F.floor(F.col(s.TS) / HOUR_MS) * HOUR_MS)
            .groupBy(key, "hour_ms")
            .agg(F.sum(engaged.cast("long")).alias("n_eng"),
                 F.sum(_positive(cfg).cast("long")).alias("n_pos"),
                 F.sum(is_rating.cast("long")).alias("n_rat"),
                 F.sum(F.when(is_rating, F.col(s.VALUE)).otherwise(0.0)).alias("sum_rat"),
                 F.sum((etype == s.IMPRESSION).cast("long")).alias("n_imp"),
                 F.sum((etype == s.CLICK).cast("long")).alias("n_click"),
                 F.max(F.when(engaged, F.col(s.TS))).alias("last_ts")))


def _genre_weights(events: DataFrame, items: DataFrame, cfg: dict[str, Any]) -> DataFrame:
    """Per (user, hour): positive weight per genre of ``GENRE_VOCAB`` (array of N_GENRES).

    Each positive spreads weight 1 evenly over its item's in-vocabulary genres.
    """
    vocab = F.array(*(F.lit(g) for g in feat.GENRE_VOCAB))
    item_genres = (items.select(s.ITEM_ID, F.explode(F.array_intersect(s.GENRES, vocab))
                                .alias("genre"))
                   .withColumn("g_idx", (F.array_position(vocab, F.col("genre")) - 1).cast("int"))
                   .withColumn("w", 1.0 / F.count("*").over(Window.partitionBy(s.ITEM_ID))))
    slots = (events.where(_positive(cfg)).select(s.USER_ID, s.ITEM_ID, s.TS)
             .join(item_genres, s.ITEM_ID)
             .withColumn("hour_ms", F.floor(F.col(s.TS) / HOUR_MS) * HOUR_MS)
             .groupBy(s.USER_ID, "hour_ms", "g_idx").agg(F.sum("w").alias("w"))
             .groupBy(s.USER_ID, "hour_ms")
             .agg(F.map_from_entries(F.collect_list(F.struct("g_idx", "w"))).alias("m")))
    return slots.select(s.USER_ID, "hour_ms", F.array(*(
        F.coalesce(F.col("m")[i], F.lit(0.0)) for i in range(feat.N_GENRES))).alias(GENRE_W))


def _stamp(frame: DataFrame) -> DataFrame:
    """Add the (date, hour) partition of ``hour_ms``."""
    return (frame.withColumn(s.DATE, F.date_format(F.timestamp_millis(F.col("hour_ms")),
                                                   "yyyy-MM-dd"))
            .withColumn(s.HOUR, F.hour(F.timestamp_millis(F.col("hour_ms"))).cast("int")))


COMPUTED = "_computed"  # <partials>/_computed/<first ms>-<end ms>: hours already summed


def _stored_hours(spark: SparkSession, root: Path) -> set[int]:
    """Epoch ms of the hours whose partials were computed (empty hours write no partition, so
    each write leaves a marker naming its hours; one folder listing)."""
    hours: set[int] = set()
    for name in list_names(spark, f"{root}/{COMPUTED}"):
        a, b = (int(x) for x in name.split("-"))
        hours.update(range(a, b, HOUR_MS))
    return hours


def _ranges(hours: list[int]) -> list[tuple[int, int]]:
    """Sorted hour starts (ms) -> maximal runs of consecutive hours as [first, last + 1 h)."""
    runs: list[tuple[int, int]] = []
    for h in hours:
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + HOUR_MS)
        else:
            runs.append((h, h + HOUR_MS))
    return runs


def update_partials(spark: SparkSession, paths: Paths, first: datetime, start: datetime,
                    end: datetime, cfg: dict[str, Any]) -> int:
    """Compute and store the user and item partials of ``[start - lateness, end)`` and of every
    hour of ``[first, end)`` that has none yet (events read once); returns the hours computed."""
    fresh = max(first, start.replace(minute=0, second=0, microsecond=0)
                - cfg["lateness_hours"] * HOUR)
    roots = {key: paths.feature_partials / name
             for key, name in ((s.USER_ID, "user"), (s.ITEM_ID, "item"))}
    stored = set.intersection(*(_stored_hours(spark, root) for root in roots.values()))
    todo = sorted({h for h in range(_ms(first), _ms(fresh), HOUR_MS) if h not in stored}
                  | set(range(_ms(fresh), _ms(end), HOUR_MS)))
    if not todo:
        return 0
    runs = _ranges(todo)
    lo, hi = (datetime.fromtimestamp(ms / 1000, tz=UTC) for ms in (runs[0][0], runs[-1][1]))
    events = (read_events(spark, paths, lo, hi, cfg["lateness_hours"] * HOUR)
              .select(s.USER_ID, s.ITEM_ID, s.TS, s.EVENT_TYPE, s.VALUE, s.DWELL_MS)
              .where(_in_runs(F.floor(F.col(s.TS) / HOUR_MS) * HOUR_MS, runs)).cache())
    items = spark.read.parquet(str(paths.items))
    for key, root in roots.items():
        part = _hourly(events, key, cfg)
        if key == s.USER_ID:
            part = part.join(_genre_weights(events, items, cfg), [s.USER_ID, "hour_ms"], "left")
        part = _stamp(part).select(*partials_schema(key).names).cache()
        for a, b in runs:
            overwrite_interval(part.where((F.col("hour_ms") >= a) & (F.col("hour_ms") < b)), root,
                               datetime.fromtimestamp(a / 1000, tz=UTC),
                               datetime.fromtimestamp(b / 1000, tz=UTC), sort_by=[key])
        part.unpersist()
        _mark_computed(spark, root, _stored_hours(spark, root) | set(todo))
    events.unpersist()
    return len(todo)


def _mark_computed(spark: SparkSession, root: Path, hours: set[int]) -> None:
    """Leave one marker per run of consecutive computed hours (new markers first, then the old
    ones go: a crash in between leaves overlapping markers, which read the same)."""
    folder = f"{root}/{COMPUTED}"
    names = {f"{a}-{b}" for a, b in _ranges(sorted(hours))}
    for name in names:
        touch(spark, f"{folder}/{name}")
    for name in set(list_names(spark, folder)) - names:
        delete(spark, f"{folder}/{name}")


def _in_runs(hour_ms, runs: list[tuple[int, int]]):
    cond = F.lit(False)
    for a, b in runs:
        cond = cond | ((hour_ms >= a) & (hour_ms < b))
    return cond


def read_partials(spark: SparkSession, paths: Paths, key: str, first: datetime,
                  end: datetime) -> DataFrame:
    """The stored partials of the hours ``[first, end)``."""
    name = "user" if key == s.USER_ID else "item"
    return read_table(spark, paths.feature_partials / name, partials_schema(key), first, end)


# ------------------------------------------------------------------------------------- transform

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


def _genre_affinity(partials: DataFrame, snaps: DataFrame, lookback_ms: int) -> DataFrame:
    """Per (user, snapshot): share of positives per genre of ``GENRE_VOCAB`` (array, sums to 1)."""
    pos = (partials.where(F.col(GENRE_W).isNotNull())
           .select(s.USER_ID, "hour_ms", F.posexplode(GENRE_W).alias("g_idx", "w"))
           .where(F.col("w") > 0)
           .join(F.broadcast(snaps), (F.col("hour_ms") < F.col("snap_ms"))
                 & (F.col("hour_ms") >= F.col("snap_ms") - lookback_ms))
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


def user_features(partials: DataFrame, users: DataFrame, snaps: DataFrame,
                  cfg: dict[str, Any]) -> DataFrame:
    """One row per (user, snapshot) with ``USER_FIELDS`` (+ user_id, event_timestamp, date),
    from the user partials of the lookback before the first snapshot up to the last."""
    lookback = cfg["lookback_days"] * DAY_MS
    win = _windowed(partials, snaps, s.USER_ID, lookback)
    aff = _genre_affinity(partials, snaps, lookback)
    ids = users.select(s.USER_ID).unionByName(partials.select(s.USER_ID))
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


def item_features(partials: DataFrame, items: DataFrame, snaps: DataFrame,
                  cfg: dict[str, Any]) -> DataFrame:
    """One row per (item, snapshot) with ``ITEM_FIELDS`` (+ item_id, event_timestamp, date)."""
    lookback = cfg["lookback_days"] * DAY_MS
    win = _windowed(partials, snaps, s.ITEM_ID, lookback)
    ids = items.select(s.ITEM_ID).unionByName(partials.select(s.ITEM_ID))
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

def load(frame: DataFrame, out: Path, times: list[datetime]) -> int:
    """Replace the snapshot days' partitions under ``out``; returns the rows written."""
    frame = frame.cache()
    n = frame.count()
    first = utc(times[0] - timedelta(milliseconds=1)).replace(hour=0, minute=0, second=0,
                                                              microsecond=0)
    last = utc(times[-1] - timedelta(milliseconds=1)).replace(hour=0, minute=0, second=0,
                                                              microsecond=0)
    overwrite_interval(frame, out, first, last + DAY, hourly=False)
    frame.unpersist()
    return n


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: dict[str, Any] | None = None) -> dict[str, int]:
    """Build the user and item snapshots for ``(start, end]``; returns row counts.

    ``end`` must be on a whole hour (windows are summed from hourly partials).
    """
    cfg = {**CONFIG, **(cfg or {})}
    # UTC-adjusted int64 micros (readers see tz-aware UTC), not Spark's legacy naive INT96
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    start, end = utc(start), utc(end)
    if _ms(end) % HOUR_MS:
        raise ValueError(f"end must be on a whole hour, got {end.isoformat()}")
    times = snapshot_times(start, end)
    snaps = spark.createDataFrame([(_ms(t),) for t in times],
                                  T.StructType([T.StructField("snap_ms", T.LongType())]))
    first = times[0] - timedelta(days=cfg["lookback_days"])
    computed = update_partials(spark, paths, first, start, end, cfg)
    items = spark.read.parquet(str(paths.items))
    users = spark.read.parquet(str(paths.users))
    counts = {"snapshots": len(times),
              "user_rows": load(user_features(read_partials(spark, paths, s.USER_ID, first, end),
                                              users, snaps, cfg), paths.user_features, times),
              "item_rows": load(item_features(read_partials(spark, paths, s.ITEM_ID, first, end),
                                              items, snaps, cfg), paths.item_features, times),
              "partial_hours": computed}
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
