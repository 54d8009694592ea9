"""Schemas of the lake tables the Spark jobs write, so readers never infer types.

Read a table with ``tandem.spark.io.read_table(spark, root, <schema>(), start, end, hourly)``:
the explicit schema keeps ``date`` a ``yyyy-MM-dd`` string (Spark would infer a DATE).

==========================  =========  ====================================================
table                       partition  rows
==========================  =========  ====================================================
lake/events                 date, hour one valid, deduplicated event (flat, ctx_*), arrival hour
lake/event_ids              date, hour xxhash64 of one kept event's id (ingest's dedup horizon)
lake/quarantine/events      date, hour one rejected landing line: reason, raw, file, line number
lake/labels/ranking         date, hour one impression (or rating) with its engagement labels
lake/negatives/retrieval    date       one sampled negative item for one positive event
lake/negatives/ranking      date       impressed-not-engaged rows and sampled negatives
lake/aggregates/item_day    date       engagement events per item on that (event) day
lake/aggregates/pos_day     date       one distinct positive (user, item) pair of that day
==========================  =========  ====================================================

The two ``lake/aggregates`` tables are ``jobs.negative_sampling``'s daily summaries: each day is
written once it is in a night's interval and read (never the day's events) by later nights.
"""

from __future__ import annotations

from pathlib import Path

from pyspark.sql.types import (
    DataType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from tandem import schema as s
from tandem.config import Paths
from tandem.spark.io import with_partitions
from tandem.spark.validate import lake_event_schema

SOURCE_FILE = "source_file"  # quarantine: the landing file
LINE_NUMBER = "line_number"  # quarantine: 0-based line index in that file
CLICKED, PLAYED, LIKED = "clicked", "played", "liked"  # labels: 0/1 per engagement type
POS_ITEM_ID = "pos_item_id"  # negatives: the positive's item
SOURCE = "source"  # negatives: "sampled", "impressed" (shown, not engaged) or "rated" (low rating)
DRAW = "k"  # negatives: rank of a sampled negative for its positive, 0..ratio-1
# labels: the impression's (or rating's) columns carried into each labelled row
LABEL_CARRIED = (s.EVENT_ID, s.REQUEST_ID, s.USER_ID, s.ITEM_ID, s.TS, s.POSITION, s.CTX_DEVICE,
                 s.CTX_COUNTRY, s.CTX_SURFACE, s.EXPERIMENT, s.VARIANT, s.MODEL_VERSION,
                 s.PROPENSITY, s.VALUE)


def _struct(fields: list[tuple[str, DataType]]) -> StructType:
    return StructType([StructField(n, t) for n, t in fields])


def events_schema() -> StructType:
    """lake/events: the flat event.v1 columns, then date, hour."""
    return with_partitions(lake_event_schema())


ID_HASH = "id_hash"  # event_ids: xxhash64(event_id)


def event_ids_schema() -> StructType:
    """lake/event_ids: one 64-bit hash per kept event id, then date, hour."""
    return with_partitions(_struct([(ID_HASH, LongType())]))


def quarantine_schema() -> StructType:
    return with_partitions(_struct([(s.REASON, StringType()), (s.RAW, StringType()),
                                    (SOURCE_FILE, StringType()), (LINE_NUMBER, IntegerType())]))


def ranking_labels_schema() -> StructType:
    """lake/labels/ranking: event columns of the impression, labels, event_timestamp, date, hour
    (of the impression: an hourly run writes the hours whose attribution windows closed)."""
    event = {f.name: f.dataType for f in lake_event_schema()}
    return with_partitions(_struct([
        *[(c, event[c]) for c in LABEL_CARRIED],
        (CLICKED, IntegerType()), (PLAYED, IntegerType()), (LIKED, IntegerType()),
        (s.DWELL_MS, LongType()), (s.LABEL, IntegerType()), (s.EVENT_TIMESTAMP, TimestampType()),
    ]))


COUNT = "count"  # aggregates/item_day: engagement events of the item that day


def item_day_root(paths: Paths) -> Path:
    return paths.lake / "aggregates" / "item_day"


def positives_day_root(paths: Paths) -> Path:
    return paths.lake / "aggregates" / "pos_day"


def item_day_schema() -> StructType:
    """lake/aggregates/item_day: item_id, count (engagements with ``ts`` on that day), date."""
    return with_partitions(_struct([(s.ITEM_ID, StringType()), (COUNT, LongType())]),
                           hourly=False)


def positives_day_schema() -> StructType:
    """lake/aggregates/pos_day: user_id, item_id (a positive engagement that day), date."""
    return with_partitions(_struct([(s.USER_ID, StringType()), (s.ITEM_ID, StringType())]),
                           hourly=False)


def negatives_schema() -> StructType:
    """lake/negatives/{retrieval,ranking}: one negative (user, item) per row.

    ``event_id``/``ts``/``event_timestamp`` are those of the positive (sampled) or of the
    impression or rating itself (impressed, rated); ``pos_item_id`` and ``k`` are null for those.
    """
    return with_partitions(_struct([
        (s.EVENT_ID, StringType()), (s.USER_ID, StringType()), (s.ITEM_ID, StringType()),
        (POS_ITEM_ID, StringType()), (SOURCE, StringType()), (DRAW, IntegerType()),
        (s.TS, LongType()), (s.EVENT_TIMESTAMP, TimestampType()),
    ]), hourly=False)
