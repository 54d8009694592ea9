"""Read and overwrite interval partitions of the lake's parquet tables.

Lake tables are partitioned by ``date`` (``yyyy-MM-dd`` string, UTC) and, for events, ``hour``
(int 0-23; Spark writes ``hour=5``, unpadded). Jobs read the partitions of an interval with
pruning-friendly filters on the partition columns and replace exactly the interval's partitions.

:func:`overwrite_interval` is an atomic partition swap, so a killed or failing task never leaves a
hole where the previous data was. It writes the interval into a staging folder under the table
(``<root>/_swap-<token>/new``; Spark and pyarrow skip ``_``-prefixed folders when reading), and
only once that write has succeeded moves each partition into place: the old folder aside
(``.../old``), the new one in; then it deletes the swap folder. An exception during the renames
puts the old folders back; a process killed between them leaves the swap folder, from which the
next write to the table restores every partition left empty (:func:`recover_swaps`). A
partition that is empty this time is removed (no stale rows). Re-running an interval gives the
same files' contents and never duplicates. Writes are rebalanced (``REBALANCE`` hint: adaptive
execution splits a big day or hour over several writers of
``spark.sql.adaptive.advisoryPartitionSizeInBytes`` each) instead of one writer per partition.

Paths go through Hadoop's FileSystem API, so the same code works on local disk, HDFS or S3.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

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


def rename(spark: SparkSession, src: str | Path, dst: str | Path) -> None:
    """Move ``src`` to ``dst`` (which must not exist), creating ``dst``'s parent folder.

    One ``FileSystem.rename``: a metadata operation on local disk and HDFS (S3 copies).
    """
    fs, jsrc = _fs(spark, src)
    jdst = _fs(spark, dst)[1]
    fs.mkdirs(jdst.getParent())
    if not fs.rename(jsrc, jdst):
        raise OSError(f"rename {src} -> {dst} failed")


def _children(spark: SparkSession, folder: str) -> list[str]:
    """Names of the sub-folders of ``folder`` (empty when it does not exist)."""
    fs, jpath = _fs(spark, folder)
    if not fs.exists(jpath):
        return []
    return sorted(st.getPath().getName() for st in fs.listStatus(jpath) if st.isDirectory())


def partition_hours(spark: SparkSession, root: str | Path) -> list[datetime]:
    """The hours of a date/hour table's partition folders, oldest first (a listing, no read)."""
    hours = []
    for day in _children(spark, str(root)):
        if not day.startswith(f"{s.DATE}="):
            continue
        date = datetime.strptime(day.split("=", 1)[1], "%Y-%m-%d").replace(tzinfo=UTC)
        hours += [date.replace(hour=int(h.split("=", 1)[1]))
                  for h in _children(spark, f"{root}/{day}") if h.startswith(f"{s.HOUR}=")]
    return sorted(hours)


def read_table(spark: SparkSession, root: str | Path, schema: StructType, start: datetime,
               end: datetime, hourly: bool = True) -> DataFrame:
    """The partitions of ``[start, end)`` of a lake table; an empty frame when it doesn't exist.

    ``schema`` must include the partition columns (:func:`with_partitions`), which also stops
    Spark from inferring ``date`` as a DATE.
    """
    if not exists(spark, root):
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(str(root)).where(in_interval(start, end, hourly))


SWAP_PREFIX = "_swap-"  # <root>/_swap-<token>/{new,old}/date=.../hour=...: staging of a swap
# Chaos testing (bench/chaos.py): a job run with TANDEM_FAILPOINT=swap-after-aside kills itself
# (SIGKILL, no cleanup, no rollback) right after its first partition was moved aside, the one
# moment a partition is absent; the retry must find it restored (recover_swaps).
FAILPOINT_ENV = "TANDEM_FAILPOINT"
SWAP_FAILPOINT = "swap-after-aside"


def _relative(root: str, folder: str) -> str:
    return folder[len(root) + 1:]


def _swap(spark: SparkSession, root: str, token: str, folders: Sequence[str]) -> None:
    """Move the staged partitions of ``token`` into place; on an exception put the old back.

    Per partition: old folder -> ``old/``, staged folder -> its place. The partition is absent
    only between those two renames; an exception anywhere puts every old partition back.
    """
    base = f"{root}/{SWAP_PREFIX}{token}"
    rels = [_relative(root, folder) for folder in folders]
    # which targets and staged folders exist: one listing per parent folder, not two
    # exists() round trips per partition (a backfill swaps thousands)
    present, staged = _present(spark, root, rels), _present(spark, f"{base}/new", rels)
    moved: list[tuple[str, str]] = []  # (target, aside) already moved aside
    try:
        for folder, rel in zip(folders, rels, strict=True):
            aside = f"{base}/old/{rel}"
            if rel in present:
                rename(spark, folder, aside)
                moved.append((folder, aside))
                if os.environ.get(FAILPOINT_ENV) == SWAP_FAILPOINT:
                    os.kill(os.getpid(), signal.SIGKILL)
            if rel in staged:
                rename(spark, f"{base}/new/{rel}", folder)
    except BaseException:
        _swap_rollback(spark, base, moved)
        raise
    delete(spark, base)


def _present(spark: SparkSession, folder: str, rels: Sequence[str]) -> set[str]:
    """The ``rels`` (``date=...`` or ``date=.../hour=...``) that exist under ``folder``."""
    by_parent: dict[str, list[str]] = {}
    for rel in rels:
        parent, _, name = rel.rpartition("/")
        by_parent.setdefault(parent, []).append(name)
    found = set()
    for parent, names in by_parent.items():
        children = set(_children(spark, f"{folder}/{parent}" if parent else folder))
        found |= {f"{parent}/{n}" if parent else n for n in names if n in children}
    return found


def _swap_rollback(spark: SparkSession, base: str, moved: Sequence[tuple[str, str]]) -> None:
    """Put every moved-aside partition back, moving a swapped-in one out of its way first."""
    for folder, aside in reversed(moved):
        if exists(spark, folder):
            rename(spark, folder, f"{base}/undone/{_relative(base, aside)}")
        rename(spark, aside, folder)


def recover_swaps(spark: SparkSession, root: str | Path) -> int:
    """Undo what a killed writer left half-swapped under ``root``; returns the swaps found.

    Every partition moved aside whose place is empty comes back from ``old/``; the ones already
    swapped keep their new data, so each partition holds one complete version, old or new, and
    the task's retry rewrites the interval. Staged data is then dropped. Call it only from the
    table's one writer (the DAG runs one at a time).
    """
    swaps = [name for name in _children(spark, root) if name.startswith(SWAP_PREFIX)]
    for name in swaps:
        base = f"{root}/{name}"
        for rel in _partition_folders(spark, f"{base}/old"):
            if not exists(spark, f"{root}/{rel}"):
                rename(spark, f"{base}/old/{rel}", f"{root}/{rel}")
        delete(spark, base)
    return len(swaps)


def _partition_folders(spark: SparkSession, folder: str) -> list[str]:
    """``date=...`` and ``date=.../hour=...`` leaf partition folders under ``folder``."""
    out = []
    for day in _children(spark, folder):
        hours = [h for h in _children(spark, f"{folder}/{day}") if h.startswith(f"{s.HOUR}=")]
        out += [f"{day}/{h}" for h in hours] or [day]
    return out


def overwrite_interval(df: DataFrame, root: str | Path, start: datetime, end: datetime,
                       hourly: bool = True, sort_by: Sequence[str] = ()) -> None:
    """Replace the partitions of ``[start, end)`` with ``df`` (which holds only those), atomically.

    Writes ``df`` into ``<root>/_swap-<token>/new`` (rebalanced over writers within each
    partition), then swaps each partition folder of the interval in (module docstring).
    ``sort_by`` orders rows within each file so re-runs write identical files.
    """
    spark, root = df.sparkSession, str(root)
    recover_swaps(spark, root)
    token = uuid4().hex
    parts = [s.DATE, s.HOUR] if hourly else [s.DATE]
    out = df.hint("rebalance", *parts)
    if sort_by:
        out = out.sortWithinPartitions(*parts, *sort_by)
    # the staging folder is new: a static write into it skips dynamic overwrite's own staging
    # folder and its per-partition moves
    (out.write.mode("overwrite").option("partitionOverwriteMode", "static").partitionBy(*parts)
     .parquet(f"{root}/{SWAP_PREFIX}{token}/new"))
    _swap(spark, root, token, interval_dirs(root, start, end, hourly))
