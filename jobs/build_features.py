"""Batch entity features for Feast: user profile/activity and item content/popularity snapshots,
built incrementally: per-hour partials written once, windows rolled forward, changed rows only.

What a snapshot at ``T`` holds (``tandem.schema`` ``USER_*``/``ITEM_*`` fields): engagement counts
over the 1h, 24h and 7d before ``T`` and over ``lookback_days`` (each window at most the
lookback), positives, smoothed mean ratings, genre affinity, smoothed CTR, last-event times, and
the profile/catalog columns of ``lake/users`` and ``lake/items``. Rows go to
``lake/features/{user,item}/date=/hour=`` of ``T - 1 ms`` with ``event_timestamp = T``.

**Events count by the hour they landed in** (``lake/events`` is partitioned by arrival hour): a
snapshot at ``T`` describes the events that had landed before ``T``, and a window of span ``W``
counts those that landed in ``[T - W, T)``. Chosen over event-hour keys because

- a snapshot is what serving could have known at ``T``: a late event never rewrites the past,
  so a training row joined at ``T`` sees exactly what the online store held (no leakage, no
  skew), and re-running an old interval gives the same rows;
- each hour's partial is a pure function of one landing partition, written once; event-hour
  partials would have to be rewritten whenever late events land in them, and the rows leaving a
  window would have to be looked up across every later landing hour;
- for an on-time event the two agree (same hour); a late event counts from when it landed.

``*_last_event_ts`` is the latest ``ts`` of an engagement landed before ``T``, 0 when none landed
in the lookback (a running maximum; only an engagement landing more than a lookback late could
make it differ from the maximum over the lookback alone). Recency ("days since") is computed at
read time from it, by ``tandem.features.entity`` for training and serving alike; no stored value
depends on ``T`` except through the windows.

How a run over ``(start, end]`` works (``tandem.spark.rolling`` has the math):

1. snapshots at ``end, end - 1 day, ...`` while after ``start`` (an hourly run: one, at ``end``);
2. **partials**: per (entity, landing hour) integer sums -- engagements, positives, ratings and
   rating sums in micro-units, impressions, clicks, the max engaged ``ts``, and per genre of
   :data:`tandem.features.entity.GENRE_VOCAB` a positive's weight ``1/k`` over its item's ``k``
   genres as ``GENRE_UNITS / k`` (``GENRE_UNITS = lcm(1..19)``: an integer, so subtraction is exact)
   -- to ``lake/aggregates/features_{user,item}/date=/hour=`` for the run's hours only (from the
   base snapshot on; a run without a base aggregates the lookback once);
3. **roll forward** from the state stored at the latest snapshot ``<= start``
   (``lake/aggregates/features_{user,item}_state/``, one full row per entity): each window gains
   the partials that landed since and loses the ones that left it; without a base (the first
   run, a backfill, a re-run older than ``state_keep_hours``) the windows are summed from the
   partials;
4. **rows only for entities whose values changed** since their previous snapshot (events landed,
   or left a window, or their profile/catalog row changed; new entities once): the latest row
   with ``event_timestamp <= T`` (what Feast's point-in-time join and materialization read)
   equals a full recomputation at ``T``. No Feast view has a TTL: a row holds until the
   entity's next one, online and in the join (``feature_repo/definitions.py``);
5. the new state at ``end``; states older than ``state_keep_hours`` are deleted.

Every output replaces its interval's partitions atomically (``tandem.spark.io``), so re-running
an interval gives the same rows. The hourly DAG runs hours in order (``depends_on_past``): each
run rolls from the previous one's state. Re-running an old interval after later runs leaves the
later ones valid (their values depend only on the partials and the profiles).

"Engagement" is every event but an impression; "positive" is ``tandem.spark.events.is_positive``
with ``positive_dwell_ms``. An item's genres are taken when a positive's hour is aggregated.

Memory model (platform: 5M users, 1M items, 50M events/day = ~2.1M an hour). An hourly run reads
its hour of events (~2.1M rows x ~60 B) and writes its partials (<= 2.1M user rows x ~220 B with
the 19 genre units, <= 1M item rows x ~70 B); it reads back five slices of partials (its hour,
and the hours leaving the 1h/24h/7d/lookback windows: ~5 x 0.5 GB) as points, and the state
(5M x ~260 B + 1M x ~140 B = ~1.4 GB, ~0.3 GB of parquet) for one sort by entity; the timeline
is persisted (memory and disk) for the two writes; rows out ~ entities active in the hour or
leaving a window (~1-3M). All of it is Spark's spillable shuffle memory; nothing is collected to
the driver but counts and the state folder listing. Only a run without a base reads the
lookback's events (365 days, once: the first run or a backfill).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import reduce
from operator import add
from pathlib import Path
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from tandem import schema as s
from tandem.config import Paths
from tandem.features import entity as feat
from tandem.spark import rolling as R
from tandem.spark.entry import job_main
from tandem.spark.events import day_of, event_timestamp, hour_of, is_positive
from tandem.spark.io import (
    HOUR,
    HOUR_MS,
    delete,
    epoch_ms,
    exists,
    in_interval,
    overwrite_interval,
    partition_dir,
    partition_hours,
    read_table,
    recover_swaps,
    utc,
    with_partitions,
)
from tandem.spark.tables import events_schema

DAY_MS = 24 * HOUR_MS
CONFIG: dict[str, Any] = {
    "lookback_days": s.FEATURE_LOOKBACK_DAYS,  # totals and last-event times look this far back
    "positive_dwell_ms": 30_000,  # a play at least this long is a positive
    "ctr_prior_a": feat.CTR_PRIOR_A,  # smoothed CTR = (clicks + a) / (impressions + a + b)
    "ctr_prior_b": feat.CTR_PRIOR_B,
    "rating_prior": feat.DEFAULT_RATING,  # mean = (sum + w * prior) / (n + w)
    "rating_prior_weight": feat.RATING_PRIOR_WEIGHT,
    "state_keep_hours": 48,  # states kept for re-runs; an older interval re-runs from partials
}
WINDOWS = {"1h": HOUR_MS, "24h": DAY_MS, "7d": 7 * DAY_MS}
LOOKBACK = "lb"  # the lookback window's suffix in partial/state column names
GENRE_UNITS = math.lcm(*range(1, feat.N_GENRES + 1))  # one positive's weight, split evenly
GENRE_COLUMNS = tuple(f"genre{i}" for i in range(feat.N_GENRES))
MICRO = 1_000_000  # rating sums in micro-ratings: integers, exact under subtraction
RATING_SUM = "rating_micro"


def snapshot_times(start: datetime, end: datetime) -> list[datetime]:
    """``end - k days`` for k = 0, 1, ... while after ``start`` (oldest first; at least end)."""
    times, t = [], end
    while t > start or not times:
        times.append(t)
        t -= timedelta(days=1)
    return times[::-1]


# -------------------------------------------------------------------------------------- partials

def _spans(lookback_ms: int, columns: dict[str, tuple[str, ...]]) -> tuple[R.Span, ...]:
    """The windows ``columns`` names (``WINDOWS`` keys and ``LOOKBACK``), each capped at the
    lookback (a snapshot never looks further back than it)."""
    spans = {**WINDOWS, LOOKBACK: lookback_ms}
    return tuple(R.Span(name, min(spans[name], lookback_ms), cols)
                 for name, cols in columns.items())


@dataclass(frozen=True)
class Entity:
    """One feature table: its key, what its partials sum, and how a state row becomes a row."""

    name: str  # "user" or "item"
    key: str
    windows: dict[str, tuple[str, ...]]  # window -> partial columns summed over it
    dims: Callable[[DataFrame], DataFrame]  # lake/users or lake/items -> key + profile columns
    dim_defaults: Callable[[], dict[str, Column]]  # profile column -> value when absent
    columns: Callable[[dict[str, Any]], dict[str, Column]]  # stored field -> from state row

    def rollup(self, lookback_ms: int) -> R.Rollup:
        return R.Rollup(self.key, _spans(lookback_ms, self.windows), ("last_ts",))

    @property
    def partial_columns(self) -> list[str]:
        return list(dict.fromkeys(c for cols in self.windows.values() for c in cols)) + ["last_ts"]

    def partials_root(self, paths: Paths) -> Path:
        return paths.lake / "aggregates" / f"features_{self.name}"

    def state_root(self, paths: Paths) -> Path:
        return paths.lake / "aggregates" / f"features_{self.name}_state"

    def out(self, paths: Paths) -> Path:
        return paths.user_features if self.name == "user" else paths.item_features


def partials(events: DataFrame, items: DataFrame, key: str,
             positive_dwell_ms: int) -> DataFrame:
    """Per (``key``, landing ``date``/``hour``) integer sums of the events (module docstring);
    per user also the genre units of their positives (``GENRE_COLUMNS``)."""
    etype = F.col(s.EVENT_TYPE)
    engaged = etype != s.IMPRESSION
    rating = (etype == s.RATING) & F.col(s.VALUE).isNotNull()
    positive = is_positive(positive_dwell_ms)
    groups = [key, s.DATE, s.HOUR]
    sums = events.groupBy(*groups).agg(
        F.sum(engaged.cast("long")).alias("n_eng"),
        F.sum(positive.cast("long")).alias("n_pos"),
        F.sum(rating.cast("long")).alias("n_rat"),
        F.sum(F.when(rating, F.round(F.col(s.VALUE) * MICRO).cast("long")).otherwise(0))
        .alias(RATING_SUM),
        F.sum((etype == s.IMPRESSION).cast("long")).alias("n_imp"),
        F.sum((etype == s.CLICK).cast("long")).alias("n_click"),
        F.max(F.when(engaged, F.col(s.TS))).alias("last_ts"))
    if key != s.USER_ID:
        return sums
    vocab = F.array(*(F.lit(g) for g in feat.GENRE_VOCAB))
    in_vocab = F.array_intersect(F.col(s.GENRES), vocab)
    genres = (items.where(F.size(in_vocab) > 0)
              .select(s.ITEM_ID, F.explode(in_vocab).alias("genre"),
                      (F.lit(GENRE_UNITS) / F.size(in_vocab)).cast("long").alias("units"))
              .select(s.ITEM_ID, (F.array_position(vocab, F.col("genre")) - 1).alias("g"),
                      "units"))
    units = (events.where(positive).select(*groups, s.ITEM_ID).join(genres, s.ITEM_ID)
             .groupBy(*groups)
             .agg(*(F.sum(F.when(F.col("g") == i, F.col("units")).otherwise(0)).alias(name)
                    for i, name in enumerate(GENRE_COLUMNS))))
    return (sums.join(units, groups, "left")
            .fillna(0, subset=list(GENRE_COLUMNS)))


def _partial_schema(entity: Entity) -> T.StructType:
    return with_partitions(T.StructType(
        [T.StructField(entity.key, T.StringType())]
        + [T.StructField(c, T.LongType()) for c in entity.partial_columns]))


def read_partials(spark: SparkSession, entity: Entity, paths: Paths,
                  ranges: list[tuple[int, int]]) -> DataFrame:
    """The stored partials of the hour ranges (epoch ms), with their hour as ``HOUR_MS``."""
    root, schema = entity.partials_root(paths), _partial_schema(entity)
    if not exists(spark, root):
        return spark.createDataFrame([], schema).withColumn(R.HOUR_MS, F.lit(0).cast("long"))
    wanted = reduce(lambda a, b: a | b, (in_interval(_dt(a), _dt(b)) for a, b in ranges if a < b))
    hour_ms = (F.unix_date(F.to_date(F.col(s.DATE))).cast("long") * DAY_MS
               + F.col(s.HOUR).cast("long") * HOUR_MS)
    return (spark.read.schema(schema).parquet(str(root)).where(wanted)
            .withColumn(R.HOUR_MS, hour_ms))


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


# ---------------------------------------------------------------------------------- state rows

def _last_ts() -> Column:
    """The running max engaged ts, 0 while nothing engaged landed in the lookback."""
    return F.when(F.col(f"n_eng_{LOOKBACK}") > 0, F.col("last_ts")).otherwise(0).cast("long")


def _smoothed_mean(cfg: dict[str, Any]) -> Column:
    w, prior = cfg["rating_prior_weight"], cfg["rating_prior"]
    return ((F.col(f"{RATING_SUM}_{LOOKBACK}") / MICRO + w * prior)
            / (F.col(f"n_rat_{LOOKBACK}") + w)).cast("float")


def _counts(names: dict[str, str]) -> dict[str, Column]:
    return {field: F.col(column).cast("long") for field, column in names.items()}


def _user_columns(cfg: dict[str, Any]) -> dict[str, Column]:
    units = [F.col(f"{g}_{LOOKBACK}") for g in GENRE_COLUMNS]
    total = reduce(add, units)
    affinity = F.array(*(F.when(total > 0, u / total).otherwise(0.0).cast("float")
                         for u in units))
    return {"user_avg_rating": _smoothed_mean(cfg),
            "user_ratings_total": F.col(f"n_rat_{LOOKBACK}"),
            "user_genre_affinity": affinity,
            **_counts({"user_events_1h": "n_eng_1h", "user_events_24h": "n_eng_24h",
                       "user_events_7d": "n_eng_7d", "user_events_total": f"n_eng_{LOOKBACK}",
                       "user_positives_7d": "n_pos_7d"}),
            "user_last_event_ts": _last_ts()}


def _item_columns(cfg: dict[str, Any]) -> dict[str, Column]:
    a, b = cfg["ctr_prior_a"], cfg["ctr_prior_b"]
    clicks, imps = F.col("n_click_7d"), F.col("n_imp_7d")
    return {**_counts({"item_pop_1h": "n_eng_1h", "item_pop_24h": "n_eng_24h",
                       "item_pop_7d": "n_eng_7d", "item_pop_total": f"n_eng_{LOOKBACK}",
                       "item_impressions_7d": "n_imp_7d", "item_clicks_7d": "n_click_7d"}),
            "item_ctr": ((clicks + a) / (imps + a + b)).cast("float"),
            "item_avg_rating": _smoothed_mean(cfg),
            "item_ratings_total": F.col(f"n_rat_{LOOKBACK}"),
            "item_last_event_ts": _last_ts()}


def _user_dims(users: DataFrame) -> DataFrame:
    return users.select(s.USER_ID, F.col(s.AGE_BUCKET).alias("user_age_bucket"),
                        F.col(s.GENDER).alias("user_gender"),
                        F.col(s.SIGNUP_TS).cast("long").alias("user_signup_ts"))


def _item_dims(items: DataFrame) -> DataFrame:
    return items.select(s.ITEM_ID, F.col(s.GENRES).alias("item_genres"),
                        F.col(s.RELEASE_YEAR).cast("long").alias("item_release_year"),
                        F.col(s.DURATION_S).cast("long").alias("item_duration_s"),
                        F.col(s.CREATED_AT).cast("long").alias("item_created_at"))


USER = Entity(
    "user", s.USER_ID,
    {"1h": ("n_eng",), "24h": ("n_eng",), "7d": ("n_eng", "n_pos"),
     LOOKBACK: ("n_eng", "n_rat", RATING_SUM, *GENRE_COLUMNS)},
    _user_dims,
    lambda: {"user_age_bucket": F.lit(""), "user_gender": F.lit(""),
             "user_signup_ts": F.lit(0).cast("long")},
    _user_columns)
ITEM = Entity(
    "item", s.ITEM_ID,
    {"1h": ("n_eng",), "24h": ("n_eng",), "7d": ("n_eng", "n_imp", "n_click"),
     LOOKBACK: ("n_eng", "n_rat", RATING_SUM)},
    _item_dims,
    lambda: {"item_genres": F.array().cast("array<string>"),
             "item_release_year": F.lit(0).cast("long"), "item_duration_s": F.lit(0).cast("long"),
             "item_created_at": F.lit(0).cast("long")},
    _item_columns)
FIELDS = {"user": [f.name for f in feat.USER_FIELDS], "item": [f.name for f in feat.ITEM_FIELDS]}


def _rows(timeline: DataFrame, dims: DataFrame, entity: Entity, values: list[str],
          base: int | None, cfg: dict[str, Any]) -> DataFrame:
    """The stored fields of every timeline row, and ``_changed``: whether they differ from the
    key's previous row. Base rows keep the profile columns stored with the state; later rows
    take today's (defaults where the entity has no profile row)."""
    defaults = entity.dim_defaults()
    now = dims.select(entity.key, *(F.col(c).alias(f"_now_{c}") for c in defaults))
    profile = {c: F.coalesce(F.col(f"_now_{c}"), d) for c, d in defaults.items()}
    if base is not None:
        profile = {c: F.when(F.col(R.SNAP) == base, F.col(c)).otherwise(v)
                   for c, v in profile.items()}
    frame = (timeline.join(now, entity.key, "left")
             .select(entity.key, R.SNAP, *values, *(v.alias(c) for c, v in profile.items())))
    columns, fields = entity.columns(cfg), FIELDS[entity.name]
    frame = frame.select(entity.key, R.SNAP, *values,
                         *(columns.get(f, F.col(f)).alias(f) for f in fields))
    return frame.withColumn("_changed", R.changed(entity.key, fields))


# ------------------------------------------------------------------------------------------- run

def _base(spark: SparkSession, root: Path, start: datetime) -> datetime | None:
    """The latest stored state's snapshot at or before ``start``, if any."""
    recover_swaps(spark, root)
    hours = [h for h in partition_hours(spark, root) if h + HOUR <= start]
    return hours[-1] + HOUR if hours else None


def build(spark: SparkSession, paths: Paths, entity: Entity, source: DataFrame,
          items: DataFrame, times: list[datetime], start: datetime, end: datetime,
          cfg: dict[str, Any]) -> dict[str, Any]:
    """Partials, roll-forward, changed rows and new state of one entity table (module doc)."""
    rollup = entity.rollup(cfg["lookback_days"] * DAY_MS)
    snaps = R.Snapshots(epoch_ms(times[0]), epoch_ms(times[-1]), DAY_MS)
    state_root = entity.state_root(paths)
    base_at = _base(spark, state_root, start)
    base = epoch_ms(base_at) if base_at else None
    first = base_at or _dt(snaps.first - rollup.longest)
    events = (read_table(spark, paths.events, events_schema(), first, end)
              .select(s.USER_ID, s.ITEM_ID, s.TS, s.EVENT_TYPE, s.VALUE, s.DWELL_MS, s.DATE,
                      s.HOUR))
    overwrite_interval(partials(events, items, entity.key, cfg["positive_dwell_ms"])
                       .select(entity.key, *entity.partial_columns, s.DATE, s.HOUR),
                       entity.partials_root(paths), first, end, sort_by=(entity.key,))
    state = spark.read.parquet(partition_dir(state_root, base_at - HOUR)) if base_at else None
    dims = entity.dims(source).dropDuplicates([entity.key])
    # every known entity is compared at the first snapshot: its profile may have changed
    known = dims.select(entity.key)
    if state is not None:
        known = known.unionByName(state.select(entity.key))
    deltas = R.points(read_partials(spark, entity, paths, R.needed(rollup, snaps, base)),
                      rollup, snaps, base)
    timeline = R.roll(rollup, deltas, state, base,
                      known.withColumn(R.SNAP, F.lit(snaps.first)), list(entity.dim_defaults()))
    timeline = (_rows(timeline, dims, entity, rollup.values, base, cfg)
                .persist(StorageLevel.MEMORY_AND_DISK))
    rows = (timeline.where(F.col("_changed") & (F.col(R.SNAP) != F.lit(base or -1)))
            .withColumn("_part_ms", F.col(R.SNAP) - 1)
            # a snapshot T goes to the partition of T - 1 ms (the hour it closes)
            .select(entity.key, *FIELDS[entity.name], event_timestamp(R.SNAP),
                    day_of("_part_ms"), hour_of("_part_ms"))
            .persist(StorageLevel.MEMORY_AND_DISK))
    n_rows = rows.count()
    overwrite_interval(rows, entity.out(paths), start, end,
                       sort_by=(entity.key, s.EVENT_TIMESTAMP))
    rows.unpersist()
    new_state = (R.latest(timeline, entity.key)
                 .select(entity.key, *rollup.values, *entity.dim_defaults())
                 .withColumn(s.DATE, F.lit(f"{end - HOUR:%Y-%m-%d}"))
                 .withColumn(s.HOUR, F.lit((end - HOUR).hour)))
    overwrite_interval(new_state, state_root, start, end, sort_by=(entity.key,))
    timeline.unpersist()
    keep = end - timedelta(hours=cfg["state_keep_hours"])
    for hour in partition_hours(spark, state_root):
        if hour + HOUR < keep:
            delete(spark, partition_dir(state_root, hour))
    return {f"{entity.name}_rows": n_rows,
            f"{entity.name}_base": base_at.isoformat() if base_at else None}


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the user and item snapshots for ``(start, end]``; returns row counts.

    ``end`` must be on a whole hour (partials are per landing hour).
    """
    cfg = {**CONFIG, **(cfg or {})}
    # UTC-adjusted int64 micros (readers see tz-aware UTC), not Spark's legacy naive INT96
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    start, end = utc(start), utc(end)
    if epoch_ms(end) % HOUR_MS:
        raise ValueError(f"end must be on a whole hour, got {end.isoformat()}")
    times = snapshot_times(start, end)
    items = spark.read.parquet(str(paths.items)).dropDuplicates([s.ITEM_ID])
    users = spark.read.parquet(str(paths.users))
    counts: dict[str, Any] = {"snapshots": len(times)}
    for entity, source in ((USER, users), (ITEM, items)):
        counts.update(build(spark, paths, entity, source, items, times, start, end, cfg))
    return counts


def main(argv: list[str] | None = None) -> None:
    job_main("build_features", run, None, argv)


if __name__ == "__main__":
    main()
