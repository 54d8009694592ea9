"""Labelled rows for the ranker: impressions joined with the engagements they caused.

Impression mode: every impression of the labelled hours (below) is joined with the engagements
that share its ``request_id``, ``user_id`` and ``item_id`` and happen within
``attribution_window`` after it (``imp.ts <= eng.ts <= imp.ts + window``), so one that lands in
the next hour or day still counts. Per impression:

* ``clicked`` / ``played`` / ``liked``: 1 when any attributed click / play / like;
* ``dwell_ms``: the longest attributed play (or complete) dwell, 0 when none;
* ``label``: 1 when any attributed engagement is positive (``tandem.spark.events.is_positive``:
  click, complete, like, share, add_to_list, a rating >= POSITIVE_RATING, or a play with
  ``dwell_ms >= dwell_threshold_ms``).

Ratings mode (data without impressions, e.g. MovieLens): one row per rating event of the labelled
hours, ``label = value >= POSITIVE_RATING``, the per-type columns 0. ``mode="auto"`` picks
impressions when the labelled hours have any, else ratings.

Every row is stamped with its impression (or rating) time: ``ts`` and ``event_timestamp``, and goes
to ``lake/labels/ranking/date=/hour=`` of that time.

A run over ``[start, end)`` labels only the impressions whose attribution windows have closed by
then: those of the hours ``[start - delay, end - delay)``, where ``delay`` is
``attribution_window + lateness`` rounded up to whole hours (2 h by default). Everything it reads
(events up to ``impression + window``, arriving up to ``lateness`` later) arrived before ``end``,
so the hourly DAG labels each hour exactly once, two hours late, after ``ingest_events`` of the
same run; it replaces exactly those hours' partitions (re-runs are idempotent). A backfill over a
range passes the range shifted by ``delay`` (:func:`closing_interval` gives it).

Memory model (platform: 50M events/day, ~2.1M an hour, ~40% impressions): a run reads
``1 + window + 2 x lateness`` hours of arrival partitions (~3.5 h, ~7M events, the columns the
join needs), joins impressions to engagements on (request, user, item) in a shuffle bounded by
those hours, and writes ~0.9M label rows an hour. Nothing but counts reaches the driver.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from tandem import schema as s
from tandem.config import Paths
from tandem.spark.entry import job_main
from tandem.spark.events import day_of, event_timestamp, hour_of, is_positive, read_events
from tandem.spark.io import HOUR, epoch_ms, hour_starts, overwrite_interval, utc
from tandem.spark.tables import CLICKED, LABEL_CARRIED, LIKED, PLAYED, ranking_labels_schema

log = logging.getLogger(__name__)
MODES = ("auto", "impressions", "ratings")
CARRIED = tuple(c for c in LABEL_CARRIED if c != s.VALUE)


@dataclass(frozen=True)
class LabelsConfig:
    """Knobs of :func:`run`.

    Attributes
    ----------
    attribution_window : engagements this long after an impression are attributed to it.
    dwell_threshold_ms : a play at least this long is a positive.
    lateness : how much later than its ``ts`` an event may arrive (arrival partitions read).
    mode : "auto", "impressions" or "ratings".
    """

    attribution_window: timedelta = timedelta(minutes=30)
    dwell_threshold_ms: int = 30_000
    lateness: timedelta = timedelta(hours=1)
    mode: str = "auto"

    @property
    def delay(self) -> timedelta:
        """How long after its hour an impression's label is final, in whole hours."""
        return HOUR * -(-(self.attribution_window + self.lateness) // HOUR)


def closing_interval(start: datetime, end: datetime, cfg: LabelsConfig) -> tuple[datetime,
                                                                                 datetime]:
    """The run interval that labels the impressions of ``[start, end)`` (whole hours)."""
    return utc(start) + cfg.delay, utc(end) + cfg.delay


def _flag(condition) -> F.Column:
    return F.max(F.when(condition, 1).otherwise(0))


def impression_labels(events: DataFrame, end_ms: int, cfg: LabelsConfig) -> DataFrame:
    """One row per impression with ``ts < end_ms`` in ``events``, engagements attributed."""
    etype = F.col(s.EVENT_TYPE)
    imp = events.where((etype == s.IMPRESSION) & (F.col(s.TS) < end_ms)).select(*CARRIED)
    window_ms = int(cfg.attribution_window.total_seconds() * 1000)
    eng = events.where((etype != s.IMPRESSION) & F.col(s.REQUEST_ID).isNotNull()).select(
        s.REQUEST_ID, s.USER_ID, s.ITEM_ID, F.col(s.TS).alias("eng_ts"), s.EVENT_TYPE,
        s.DWELL_MS, is_positive(cfg.dwell_threshold_ms).alias("positive"))
    joined = imp.join(eng, [s.REQUEST_ID, s.USER_ID, s.ITEM_ID]).where(
        (F.col("eng_ts") >= F.col(s.TS)) & (F.col("eng_ts") <= F.col(s.TS) + window_ms))
    # impressions without an attributed engagement come back with zeros in the join below
    attributed = joined.groupBy(s.EVENT_ID).agg(
        _flag(etype == s.CLICK).alias(CLICKED), _flag(etype == s.PLAY).alias(PLAYED),
        _flag(etype == s.LIKE).alias(LIKED),
        F.coalesce(F.max(F.when(etype.isin(s.PLAY, s.COMPLETE), F.col(s.DWELL_MS))),
                   F.lit(0)).cast("long").alias(s.DWELL_MS),
        _flag(F.col("positive")).alias(s.LABEL))
    return imp.join(attributed, s.EVENT_ID, "left").select(
        *CARRIED, F.lit(None).cast("double").alias(s.VALUE),
        *[F.coalesce(F.col(c), F.lit(0)).cast(t).alias(c) for c, t in (
            (CLICKED, "int"), (PLAYED, "int"), (LIKED, "int"), (s.DWELL_MS, "long"),
            (s.LABEL, "int"))],
        event_timestamp(), day_of(), hour_of())


def rating_labels(events: DataFrame, end_ms: int) -> DataFrame:
    """One row per rating event with ``ts < end_ms``: label = value >= POSITIVE_RATING."""
    ratings = events.where((F.col(s.EVENT_TYPE) == s.RATING) & (F.col(s.TS) < end_ms))
    zero = F.lit(0)
    return ratings.select(
        *CARRIED, s.VALUE, zero.alias(CLICKED), zero.alias(PLAYED), zero.alias(LIKED),
        zero.cast("long").alias(s.DWELL_MS),
        F.coalesce((F.col(s.VALUE) >= s.POSITIVE_RATING).cast("int"), zero).alias(s.LABEL),
        event_timestamp(), day_of(), hour_of())


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: LabelsConfig = LabelsConfig()) -> dict[str, int | str]:
    """Label the impressions (or ratings) whose attribution windows closed in ``[start, end)``."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    hour_starts(start, end)  # whole hours only
    lo, hi = utc(start) - cfg.delay, utc(end) - cfg.delay
    end_ms = epoch_ms(hi)
    events = read_events(spark, paths, lo, hi + cfg.attribution_window, cfg.lateness).cache()
    mode = cfg.mode
    if mode == "auto":
        has_imp = events.where((F.col(s.EVENT_TYPE) == s.IMPRESSION)
                               & (F.col(s.TS) < end_ms)).limit(1).count() > 0
        mode = "impressions" if has_imp else "ratings"
    labels = (impression_labels(events, end_ms, cfg) if mode == "impressions"
              else rating_labels(events, end_ms)).select(*ranking_labels_schema().names).cache()
    stats = labels.agg(F.count("*").alias("rows"), F.sum(s.LABEL).alias("positives")).first()
    overwrite_interval(labels, paths.ranking_labels, lo, hi, sort_by=[s.TS, s.EVENT_ID])
    counts = {"mode": mode, "rows": stats["rows"], "positives": stats["positives"] or 0}
    labels.unpersist()
    events.unpersist()
    log.info("build_labels [%s, %s) -> impressions of [%s, %s): %s", start.isoformat(),
             end.isoformat(), lo.isoformat(), hi.isoformat(), counts)
    return counts


def main(argv: list[str] | None = None) -> dict[str, int | str]:
    return job_main("build_labels", run, LabelsConfig(), argv)


if __name__ == "__main__":
    main()
