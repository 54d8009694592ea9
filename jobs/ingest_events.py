"""Landing JSON lines -> validated, deduplicated lake events (+ a quarantine with reasons).

For every landing hour in ``[start, end)`` (``landing/events/date=/hour=/*.jsonl``, by ARRIVAL
hour) the job:

1. reads the files as text (one row per file, split into numbered lines; landing files are
   micro-batches, far below Spark's 2 GiB per-row limit), so bad bytes or broken JSON never crash
   it; blank lines are skipped;
2. judges each line with ``tandem.spark.validate`` (the event.v1 JSON Schema; reasons equal the
   Python validator's), against the end of its landing hour for ``future_ts``;
3. writes rejected lines to ``lake/quarantine/events/date=/hour=`` (reason, raw, source file and
   line number), partitioned by landing hour; ``raw`` is the decoded text (undecodable bytes
   appear as U+FFFD);
4. deduplicates valid events by ``event_id``: within the interval the first by (landing hour,
   file name, line number) is kept, and ids already in ``lake/events`` in the ``lookback`` hours
   strictly before ``start`` are dropped (Kafka replays after a crash land in a later hour);
5. writes the rest, flat (``context`` -> ``ctx_*``), to ``lake/events/date=/hour=`` (landing hour).

Both outputs replace the interval's partitions, and nothing at or after ``start`` is read from
the lake, so re-running an interval gives the same output and never duplicates.

Counts returned and logged: ``read = valid + invalid + duplicate`` (non-blank lines).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from tandem import schema as s
from tandem.config import Paths
from tandem.spark.entry import job_main
from tandem.spark.io import (
    HOUR_MS,
    glob,
    hour_starts,
    overwrite_interval,
    read_table,
    utc,
)
from tandem.spark.tables import LINE_NUMBER, SOURCE_FILE, events_schema, quarantine_schema
from tandem.spark.validate import PARSED, flat_event_columns, with_reason

log = logging.getLogger(__name__)
_PARTITION = r"date=(\d{4}-\d{2}-\d{2})/hour=(\d{1,2})/"


@dataclass(frozen=True)
class IngestConfig:
    """Knobs of :func:`run`.

    Attributes
    ----------
    lookback : how far before ``start`` lake event ids are checked for replays (default 48 h).
    pattern : file glob inside each landing hour folder.
    """

    lookback: timedelta = timedelta(hours=48)
    pattern: str = "*.jsonl"


def landing_files(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
                  pattern: str) -> list[str]:
    """Landing files of the hours in ``[start, end)``, sorted (one listing per day)."""
    hours = {(f"{at:%Y-%m-%d}", at.hour) for at in hour_starts(start, end)}
    files = []
    for day in sorted({d for d, _ in hours}):
        for f in glob(spark, f"{paths.landing_events}/date={day}/hour=*/{pattern}"):
            found = re.search(_PARTITION, f)
            if found and (found.group(1), int(found.group(2))) in hours:
                files.append(f)
    return sorted(files)


def read_lines(spark: SparkSession, files: list[str]) -> DataFrame:
    """One row per non-blank line: raw (text), source_file, line_number, date, hour."""
    if not files:
        return spark.createDataFrame([], quarantine_schema()).drop(s.REASON)
    raw = spark.read.text(files, wholetext=True).select(
        "value", F.col("_metadata.file_path").alias(SOURCE_FILE))
    lines = raw.select(SOURCE_FILE, F.posexplode(F.split("value", "\n")).alias(LINE_NUMBER, "l"))
    return (lines
            .select(F.regexp_replace("l", "\r$", "").alias(s.RAW), SOURCE_FILE,
                    F.col(LINE_NUMBER).cast("int").alias(LINE_NUMBER),
                    F.regexp_extract(SOURCE_FILE, _PARTITION, 1).alias(s.DATE),
                    F.regexp_extract(SOURCE_FILE, _PARTITION, 2).cast("int").alias(s.HOUR))
            .where(F.trim(s.RAW) != ""))


def judge(lines: DataFrame) -> DataFrame:
    """Add ``reason`` (null = valid) and the parsed event; judged at the landing hour's end.

    The landing hour (not the whole interval) is the reference, so a line gets the same verdict
    whether the interval is one hour or a day.
    """
    hour_end_ms = ((F.unix_date(F.to_date(s.DATE)).cast("long") * 24 + F.col(s.HOUR) + 1)
                   * HOUR_MS)
    return with_reason(lines, s.RAW, hour_end_ms)


def mark_duplicates(valid: DataFrame, seen_ids: DataFrame) -> DataFrame:
    """Add ``duplicate``: not the first of its event_id in the interval, or seen before it."""
    first = Window.partitionBy(s.EVENT_ID).orderBy(s.DATE, s.HOUR, SOURCE_FILE, LINE_NUMBER)
    seen = seen_ids.select(s.EVENT_ID).distinct().withColumn("_seen", F.lit(True))
    return (valid.withColumn("_rank", F.row_number().over(first))
            .join(seen, s.EVENT_ID, "left")
            .withColumn("duplicate", (F.col("_rank") > 1) | F.col("_seen").isNotNull())
            .drop("_rank", "_seen"))


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: IngestConfig = IngestConfig()) -> dict[str, int]:
    """Ingest the landing hours of ``[start, end)``; returns read/valid/invalid/duplicate."""
    start, end = utc(start), utc(end)
    files = landing_files(spark, paths, start, end, cfg.pattern)
    judged = judge(read_lines(spark, files)).cache()
    invalid = judged.where(F.col(s.REASON).isNotNull()).select(*quarantine_schema().names)
    seen = read_table(spark, paths.events, events_schema(), start - cfg.lookback, start)
    candidates = mark_duplicates(
        judged.where(F.col(s.REASON).isNull()).select(
            *flat_event_columns(F.col(PARSED)), s.DATE, s.HOUR, SOURCE_FILE, LINE_NUMBER),
        seen).cache()
    totals = judged.agg(F.count("*").alias("read"),
                        F.count(s.REASON).alias("invalid")).first()
    dup = candidates.agg(F.count("*").alias("n"),
                         F.sum(F.col("duplicate").cast("int")).alias("dup")).first()
    counts = {"read": totals["read"], "valid": dup["n"] - (dup["dup"] or 0),
              "invalid": totals["invalid"], "duplicate": dup["dup"] or 0, "files": len(files)}
    overwrite_interval(candidates.where(~F.col("duplicate")).select(*events_schema().names),
                       paths.events, start, end, sort_by=[s.TS, s.EVENT_ID])
    overwrite_interval(invalid, paths.quarantine_events, start, end,
                       sort_by=[SOURCE_FILE, LINE_NUMBER])
    judged.unpersist()
    candidates.unpersist()
    log.info("ingest_events [%s, %s): %s", start.isoformat(), end.isoformat(), counts)
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    return job_main("ingest_events", run, IngestConfig(), argv)


if __name__ == "__main__":
    main()
