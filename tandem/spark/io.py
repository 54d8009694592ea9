"""Read and overwrite interval partitions of the lake's parquet tables.

Lake tables are partitioned by ``date`` (``yyyy-MM-dd`` string, UTC) and, for events, ``hour``
(int 0-23; Spark writes ``hour=5``, unpadded). Jobs read the partitions of an interval with
pruning-friendly filters on the partition columns and replace exactly the interval's partitions:
:func:`overwrite_interval` first deletes every partition of the interval (so a partition that is
empty this time does not keep stale rows), then writes with dynamic partition overwrite. That
makes a re-run of the same interval produce the same files' contents and never duplicates.

Paths go through Hadoop's FileSystem API, so the same code works on local disk, HDFS or S3.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from tandem import schema as s

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
HOUR_MS = 3_600_000


def utc(ts: datetime) -> datetime:
    """``ts`` as an aware UTC datetime (naive values are taken to be UTC)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def epoch_ms(ts: datetime) -> int:
    return int(utc(ts).timestamp() * 1000)


def hour_starts(start: datetime, end: datetime) -> list[datetime]:
    """The UTC hours ``[start, end)`` covers; both ends must be whole hours."""
    start, end = utc(start), utc(end)
    if start.minute or start.second or start.microsecond or end.minute or end.second \
            or end.microsecond or end < start:
        raise ValueError(f"interval [{start}, {end}) must be whole UTC hours")
    n = int((end - start) / HOUR)
    return [start + i * HOUR for i in range(n)]


def day_starts(start: datetime, end: datetime) -> list[datetime]:
    """The UTC days ``[start, end)`` covers; both ends must be midnights (daily tables)."""
    if utc(start).hour or utc(end).hour:
        raise ValueError(f"interval [{start}, {end}) must be whole UTC days")
    return hour_starts(start, end)[::24]


def covering_days(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The whole UTC days ``[start, end)`` touches: an hourly run of a daily job recomputes (and
    overwrites) its day so far, which keeps it idempotent."""
    start, end = utc(start), utc(end)
    day_start = start.replace(hour=0, minute=0, second=0, microsecond=0)
    day_end = end.replace(hour=0, minute=0, second=0, microsecond=0)
    if day_end < end:
        day_end += 24 * HOUR
    return day_start, max(day_end, day_start + 24 * HOUR)


def with_partitions(schema: StructType, hourly: bool = True) -> StructType:
    """``schema`` plus the partition columns (date string, hour int)."""
    extra = [StructField(s.DATE, StringType())]
    if hourly:
        extra.append(StructField(s.HOUR, IntegerType()))
    return StructType([*schema.fields, *extra])


def in_interval(start: datetime, end: datetime, hourly: bool = True) -> Column:
    """Partition filter for ``[start, end)`` on (date, hour), or on date alone.

    Compares yyyy-MM-dd strings lexicographically, so Spark prunes partitions from it.
    """
    start, end = utc(start), utc(end)
    d0, d1 = F.lit(start.strftime("%Y-%m-%d")), F.lit(end.strftime("%Y-%m-%d"))
    date = F.col(s.DATE)
    if not hourly:
        return (date >= d0) & (date < d1)
    hour = F.col(s.HOUR)
    return (((date > d0) | ((date == d0) & (hour >= start.hour)))
            & ((date < d1) | ((date == d1) & (hour < end.hour))))


def partition_dir(root: str | Path, at: datetime, hourly: bool = True) -> str:
    """The folder Spark writes for the partition that holds ``at``."""
    at = utc(at)
    part = f"{root}/{s.DATE}={at:%Y-%m-%d}"
    return f"{part}/{s.HOUR}={at.hour}" if hourly else part


def interval_dirs(root: str | Path, start: datetime, end: datetime,
                  hourly: bool = True) -> list[str]:
    """The partition folders of ``[start, end)``; a whole day's hours as its date folder."""
    if not hourly:
        return [partition_dir(root, at, hourly=False) for at in day_starts(start, end)]
    by_day: dict[datetime, list[datetime]] = {}
    for at in hour_starts(start, end):
        by_day.setdefault(at.replace(hour=0), []).append(at)
    folders = []
    for day, hours in by_day.items():
        if len(hours) == 24:
            folders.append(partition_dir(root, day, hourly=False))
        else:
            folders += [partition_dir(root, at) for at in hours]
    return folders


def _fs(spark: SparkSession, path: str | Path):
    jvm = spark.sparkContext._jvm
    jpath = jvm.org.apache.hadoop.fs.Path(str(path))
    return jpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), jpath


def exists(spark: SparkSession, path: str | Path) -> bool:
    fs, jpath = _fs(spark, path)
    return bool(fs.exists(jpath))


def glob(spark: SparkSession, pattern: str | Path) -> list[str]:
    """Files matching a Hadoop glob, sorted (empty when nothing matches)."""
    fs, jpath = _fs(spark, pattern)
    found = fs.globStatus(jpath) or []
    return sorted(str(st.getPath().toString()) for st in found if st.isFile())


def delete(spark: SparkSession, path: str | Path) -> None:
    fs, jpath = _fs(spark, path)
    if fs.exists(jpath):
        fs.delete(jpath, True)


def read_table(spark: SparkSession, root: str | Path, schema: StructType, start: datetime,
               end: datetime, hourly: bool = True) -> DataFrame:
    """The partitions of ``[start, end)`` of a lake table; an empty frame when it doesn't exist.

    ``schema`` must include the partition columns (:func:`with_partitions`), which also stops
    Spark from inferring ``date`` as a DATE.
    """
    if not exists(spark, root):
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(str(root)).where(in_interval(start, end, hourly))


def overwrite_interval(df: DataFrame, root: str | Path, start: datetime, end: datetime,
                       hourly: bool = True, sort_by: Sequence[str] = ()) -> None:
    """Replace the partitions of ``[start, end)`` with ``df`` (which holds only those).

    Clears the interval's partition folders, then writes with dynamic partition overwrite
    (``tandem.spark.session``). ``df`` must not be lazily reading those same folders.
    ``sort_by`` orders rows within each file so re-runs write identical files.
    """
    spark = df.sparkSession
    for folder in interval_dirs(root, start, end, hourly):
        delete(spark, folder)
    parts = [s.DATE, s.HOUR] if hourly else [s.DATE]
    out = df.repartition(*parts)
    if sort_by:
        out = out.sortWithinPartitions(*parts, *sort_by)
    out.write.mode("overwrite").partitionBy(*parts).parquet(str(root))
