"""One interval of the lake as a :class:`tandem.dataset.Dataset`, read with pyarrow (no Spark).

The nightly chain's single-machine steps (ranker training, the offline evaluation) read their
training window through :func:`read_window`, with the same rules the Spark and two-tower jobs
apply, so every part of one bundle sees the same rows:

- events with ``start <= ts < end`` whose arrival partition ``date >= day(start)`` (nothing
  arrives before it happens; late arrivals after ``end`` still count), sorted by (ts, event_id);
- items created before ``end`` (the catalog as it stood at the end of the window);
- every user profile.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as ds

from tandem import schema as s
from tandem.config import Paths
from tandem.dataset import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, Dataset, conform

PARTITIONS = ds.partitioning(pa.schema([(s.DATE, pa.string()), (s.HOUR, pa.int32())]),
                             flavor="hive")


def epoch_ms(t: datetime) -> int:
    """Epoch milliseconds of ``t`` (naive datetimes are UTC)."""
    return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)


def day_of(t: datetime) -> str:
    """The UTC date of ``t`` as the lake's ``date`` partition value (yyyy-MM-dd)."""
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%d")


def read_window(paths: Paths, start: datetime, end: datetime, name: str = "lake") -> Dataset:
    """Events of ``[start, end)``, items created before ``end`` and all profiles.

    Returns
    -------
    Dataset
        Frames with exactly :data:`tandem.dataset.EVENT_COLUMNS` / ``ITEM_COLUMNS`` /
        ``USER_COLUMNS``; events sorted by (ts, event_id), items by item_id, users by user_id.
    """
    lo, hi = epoch_ms(start), epoch_ms(end)
    events = ds.dataset(paths.events, format="parquet", partitioning=PARTITIONS).to_table(
        columns=list(EVENT_COLUMNS),
        filter=(ds.field(s.DATE) >= day_of(start)) & (ds.field(s.TS) >= lo)
        & (ds.field(s.TS) < hi)).sort_by([(s.TS, "ascending"), (s.EVENT_ID, "ascending")])
    items = ds.dataset(paths.items, format="parquet").to_table(
        filter=ds.field(s.CREATED_AT) < hi).sort_by(s.ITEM_ID)
    users = ds.dataset(paths.users, format="parquet").to_table().sort_by(s.USER_ID)
    return Dataset(conform(events.to_pandas(), EVENT_COLUMNS),
                   conform(items.to_pandas(), ITEM_COLUMNS),
                   conform(users.to_pandas(), USER_COLUMNS), name)
