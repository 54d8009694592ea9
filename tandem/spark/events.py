"""Lake events by EVENT time, and the one definition of a positive engagement (Spark twin of
``tandem.data.dataset.positives``).

``lake/events`` is partitioned by ARRIVAL hour. An event whose ``ts`` lies in ``[start, end)`` may
have arrived a little before ``start`` (client clocks run ahead, up to the validator's skew) or
after ``end`` (late delivery), so :func:`read_events` reads the arrival partitions of
``[start - slack, end + slack)`` and filters on ``ts``. Events later than ``slack`` are missed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from tandem import schema as s
from tandem.config import Paths
from tandem.spark.io import epoch_ms, read_table
from tandem.spark.tables import events_schema


def read_events(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
                slack: timedelta = timedelta(hours=1)) -> DataFrame:
    """Lake events with ``start <= ts < end`` (epoch ms), whatever hour they arrived in."""
    last = end + slack
    if last.minute or last.second or last.microsecond:  # the arrival hour ``last`` falls in
        last = last.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    df = read_table(spark, paths.events, events_schema(), start - slack, last)
    return df.where((F.col(s.TS) >= epoch_ms(start)) & (F.col(s.TS) < epoch_ms(end)))


def is_positive(dwell_threshold_ms: int | None) -> Column:
    """True for a positive engagement: a type in ``POSITIVE_EVENT_TYPES``, a rating with
    ``value >= POSITIVE_RATING``, or (threshold set) a play with ``dwell_ms >= threshold``."""
    etype = F.col(s.EVENT_TYPE)
    positive = etype.isin(list(s.POSITIVE_EVENT_TYPES)) | (
        (etype == s.RATING) & (F.col(s.VALUE) >= s.POSITIVE_RATING))
    if dwell_threshold_ms is not None:
        positive = positive | ((etype == s.PLAY) & (F.col(s.DWELL_MS) >= dwell_threshold_ms))
    return F.coalesce(positive, F.lit(False))


def event_timestamp(ts: str = s.TS) -> Column:
    """Epoch ms -> TIMESTAMP (``event_timestamp``, what Feast joins on)."""
    return F.timestamp_millis(F.col(ts)).alias(s.EVENT_TIMESTAMP)


def day_of(ts: str = s.TS) -> Column:
    """Epoch ms -> the UTC ``date`` partition string (independent of the session time zone)."""
    return F.date_format(F.date_from_unix_date(
        F.floor(F.col(ts) / 86_400_000).cast("int")), "yyyy-MM-dd").alias(s.DATE)


def hour_of(ts: str = s.TS) -> Column:
    """Epoch ms -> the UTC ``hour`` partition int (0-23)."""
    return F.pmod(F.floor(F.col(ts) / 3_600_000), F.lit(24)).cast("int").alias(s.HOUR)
