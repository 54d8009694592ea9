"""Negatives for training: popularity-smoothed samples for retrieval, shown-not-engaged for ranking.

Retrieval (``lake/negatives/retrieval/date=``): for every positive engagement event with
``start <= ts < end`` (``tandem.spark.events.is_positive``), ``ratio`` items sampled with
probability proportional to ``popularity ** alpha`` (popularity = engagement events per item in
``[start - lookback, end)``), excluding every item the user engaged positively with in that window
(``tandem.spark.sampling``: seeded by hashing, so re-runs give the same rows).

Popularity and exclusions come from daily aggregates, not from the lookback's events: per event
day, engagements per item (``lake/aggregates/item_day``) and the distinct positive (user, item)
pairs (``lake/aggregates/pos_day``). A run writes the aggregates of its own days (from the
events it reads anyway) and reads those of the lookback, which earlier nights wrote; lookback
days after the last one written (the first night, nights that did not run) are computed once
from their events. A day's
aggregate sees the events that arrived within ``lateness`` of it, like every event read.

Ranking (``lake/negatives/ranking/date=``), from ``lake/labels/ranking`` of the same days
(run ``jobs.build_labels`` first): every label-0 row (``source`` "impressed": shown but not
engaged; "rated": a rating below POSITIVE_RATING), plus ``ratio`` sampled items per label-1 row
("sampled", same sampler, another salt).

Rows carry the positive's (or the shown row's) ``event_id``, ``ts`` and ``event_timestamp`` and
go to that day's partition. An interval is widened to the whole UTC days it touches; their
partitions are replaced (atomically, ``tandem.spark.io``).

Memory model (platform: 5M users, 1M items, 50M events/day, ~60% engagements; the nightly DAG
passes 28 days): the events of the interval are read once (user, item, ts, type, value, dwell:
~50 B a row, 28 days x 30M engagements = ~40 GB scanned, cached spillable) and reduced to their
days' aggregates (<= 1M item rows and ~30M positive pairs a day); the lookback adds only its
aggregates (28 x (1M + 30M) rows of ~40 B, ~35 GB, scanned by the executors). Popularity per
item (<= 1M rows) is the one driver-side step (~50 MB of pandas, refused past
``TANDEM_DRIVER_MAX_ROWS``). The sampler's lookup table (~2 x 1M rows, ~100 MB) is broadcast, so
the draws (``ratio x oversample`` per positive) are joined where they are made; only the
exclusion anti-join and the per-positive ranking shuffle them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from tandem import schema as s
from tandem.config import Paths
from tandem.spark.driver import to_pandas_bounded
from tandem.spark.entry import job_main
from tandem.spark.events import day_of, event_timestamp, is_positive, read_events
from tandem.spark.io import (
    covering_days,
    day_starts,
    exists,
    overwrite_interval,
    partition_dir,
    read_table,
)
from tandem.spark.sampling import sample_negatives
from tandem.spark.tables import (
    COUNT,
    DRAW,
    POS_ITEM_ID,
    SOURCE,
    item_day_root,
    item_day_schema,
    negatives_schema,
    positives_day_root,
    positives_day_schema,
    ranking_labels_schema,
)

log = logging.getLogger(__name__)
SAMPLED, IMPRESSED, RATED = "sampled", "impressed", "rated"


@dataclass(frozen=True)
class NegativesConfig:
    """Knobs of :func:`run`.

    Attributes
    ----------
    ratio : sampled negatives per positive (retrieval and ranking).
    alpha : popularity smoothing exponent (0.75 as in word2vec).
    seed : sampling seed; same seed and inputs -> same negatives.
    lookback : window before ``start`` for popularity and for the user's positives.
    dwell_threshold_ms : a play at least this long is a positive.
    lateness : how much later than its ``ts`` an event may arrive.
    oversample : draws per kept negative, to survive exclusions.
    """

    ratio: int = 4
    alpha: float = 0.75
    seed: int = 17
    lookback: timedelta = timedelta(days=28)
    dwell_threshold_ms: int = 30_000
    lateness: timedelta = timedelta(hours=1)
    oversample: int = 4


def _sampled(anchors: DataFrame, exclude: DataFrame, counts, cfg: NegativesConfig,
             salt: str) -> DataFrame:
    """Negatives for ``anchors`` (event_id, user_id, item_id, ts), in the negatives schema."""
    neg = sample_negatives(anchors, s.EVENT_ID, exclude, counts, cfg.ratio, cfg.alpha,
                           cfg.seed, salt, cfg.oversample)
    pos = anchors.select(s.EVENT_ID, F.col(s.ITEM_ID).alias(POS_ITEM_ID), s.TS)
    return neg.join(pos, s.EVENT_ID).select(
        s.EVENT_ID, s.USER_ID, s.ITEM_ID, POS_ITEM_ID, F.lit(SAMPLED).alias(SOURCE), DRAW, s.TS,
        event_timestamp(), day_of())


def write_day_aggregates(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
                         cfg: NegativesConfig, events: DataFrame | None = None) -> None:
    """Replace the aggregates of the whole days ``[start, end)`` (from ``events``, the days'
    events if given, else read from the lake)."""
    if events is None:
        events = read_events(spark, paths, start, end, cfg.lateness)
    engaged = events.where(F.col(s.EVENT_TYPE) != s.IMPRESSION)
    items = engaged.groupBy(day_of(), s.ITEM_ID).agg(F.count("*").alias(COUNT))
    pairs = (engaged.where(is_positive(cfg.dwell_threshold_ms))
             .select(s.USER_ID, s.ITEM_ID, day_of()).distinct())
    overwrite_interval(items, item_day_root(paths), start, end, hourly=False,
                       sort_by=[s.ITEM_ID])
    overwrite_interval(pairs, positives_day_root(paths), start, end, hourly=False,
                       sort_by=[s.USER_ID, s.ITEM_ID])


def fill_lookback(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
                  cfg: NegativesConfig) -> int:
    """Write the aggregates of the days of ``[start, end)`` after the last one written; returns
    the days computed (0 once the earlier nights wrote them).

    "After the last written" rather than "every absent day": a day without engagements leaves
    no partition, and must not send every night back to its events.
    """
    days = day_starts(start, end)
    root = item_day_root(paths)
    written = [i for i, d in enumerate(days)
               if exists(spark, partition_dir(root, d, hourly=False))]
    first = written[-1] + 1 if written else 0
    if first < len(days):
        write_day_aggregates(spark, paths, days[first], end, cfg)
    return len(days) - first


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: NegativesConfig = NegativesConfig()) -> dict[str, int]:
    """Write retrieval and ranking negatives for the whole UTC days ``[start, end)``."""
    start, end = covering_days(start, end)
    lookback_start = covering_days(start - cfg.lookback, start)[0]
    filled = fill_lookback(spark, paths, lookback_start, start, cfg)
    window = read_events(spark, paths, start, end, cfg.lateness).cache()
    write_day_aggregates(spark, paths, start, end, cfg, window)
    day_counts = read_table(spark, item_day_root(paths), item_day_schema(), lookback_start, end,
                            hourly=False)
    counts = to_pandas_bounded(day_counts.groupBy(s.ITEM_ID).agg(F.sum(COUNT).alias("count")),
                               "item popularity")
    exclude = (read_table(spark, positives_day_root(paths), positives_day_schema(),
                          lookback_start, end, hourly=False)
               .select(s.USER_ID, s.ITEM_ID).distinct().cache())

    anchors = (window.where(is_positive(cfg.dwell_threshold_ms))
               .select(s.EVENT_ID, s.USER_ID, s.ITEM_ID, s.TS))
    retrieval = _sampled(anchors, exclude, counts, cfg, "retrieval").select(
        *negatives_schema().names).cache()

    labels = read_table(spark, paths.ranking_labels, ranking_labels_schema(), start, end,
                        hourly=False)
    shown = labels.where(F.col(s.LABEL) == 0).select(
        s.EVENT_ID, s.USER_ID, s.ITEM_ID, F.lit(None).cast("string").alias(POS_ITEM_ID),
        F.when(F.col(s.REQUEST_ID).isNotNull(), IMPRESSED).otherwise(RATED).alias(SOURCE),
        F.lit(None).cast("int").alias(DRAW), s.TS, s.EVENT_TIMESTAMP, s.DATE)
    ranking_pos = labels.where(F.col(s.LABEL) == 1).select(s.EVENT_ID, s.USER_ID, s.ITEM_ID, s.TS)
    ranking = shown.unionByName(_sampled(ranking_pos, exclude, counts, cfg, "ranking")).select(
        *negatives_schema().names).cache()

    per_source = {r[SOURCE]: r["count"] for r in ranking.groupBy(SOURCE).count().collect()}
    result = {"positives": anchors.count(), "retrieval": retrieval.count(),
              "lookback_days_computed": filled,
              "ranking_impressed": per_source.get(IMPRESSED, 0),
              "ranking_rated": per_source.get(RATED, 0),
              "ranking_sampled": per_source.get(SAMPLED, 0)}
    order = [s.TS, s.EVENT_ID, SOURCE, DRAW, s.ITEM_ID]
    overwrite_interval(retrieval, paths.retrieval_negatives, start, end, hourly=False,
                       sort_by=order)
    overwrite_interval(ranking, paths.ranking_negatives, start, end, hourly=False, sort_by=order)
    for df in (window, exclude, retrieval, ranking):
        df.unpersist()
    log.info("negative_sampling [%s, %s): %s", start.isoformat(), end.isoformat(), result)
    return result


def main(argv: list[str] | None = None) -> dict[str, int]:
    return job_main("negative_sampling", run, NegativesConfig(), argv)


if __name__ == "__main__":
    main()
