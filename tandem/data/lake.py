"""The lake as single-machine learners read it, with pyarrow (no Spark): the night's int-coded
training table (:class:`TrainingTable`, the learners' input), the sampled request users' rows of
one interval as a :class:`tandem.data.dataset.Dataset` (:func:`read_window`) and the item features'
columns of every event of an interval in numpy (:func:`read_item_events`).

Models learn from the table only (``jobs/build_training_table.py`` writes it in Spark). The
ranker's and the evaluation's in-process features also need raw events: the request users'
rows (a cap, whatever the platform's size) through :func:`read_window`, and for the item
features, which count every user's events, four numpy columns streamed batch by batch through
:func:`read_item_events` -- never a pandas frame of the window. Both use the window rules of the
Spark table, so every part of one bundle sees the same rows:

- events with ``start <= ts < end`` whose arrival partition ``date >= day(start)`` (nothing
  arrives before it happens; late arrivals after ``end`` still count), sorted by (ts, event_id);
- items created before ``end`` (the catalog as it stood at the end of the window);
- the requested users' profiles.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import scipy.sparse as sp

from tandem import schema as s
from tandem.config import Paths, within_driver_budget
from tandem.data.dataset import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, Dataset, conform
from tandem.data.item_events import EVENT_CODES, ItemEvents

EVENT_ROW_BYTES = 400  # one event row in pandas: 17 columns, most of them Python strings
# one event in ItemEvents (21 B), held twice while it is sorted by (item, ts), plus the sort's
# int64 order; later a windowed count's int64 keys and cumulative sums fit in the same peak
ITEM_EVENT_BYTES = 56
ITEM_EVENT_CHUNK = 1 << 20  # events coded per catalog lookup in read_item_events
PARTITIONS = ds.partitioning(pa.schema([(s.DATE, pa.string()), (s.HOUR, pa.int32())]),
                             flavor="hive")


def epoch_ms(t: datetime) -> int:
    """Epoch milliseconds of ``t`` (naive datetimes are UTC)."""
    return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)


def day_of(t: datetime) -> str:
    """The UTC date of ``t`` as the lake's ``date`` partition value (yyyy-MM-dd)."""
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%d")


def _window(start: datetime, end_ms: int) -> ds.Expression:
    """The window rule on lake events: ``start <= ts < end_ms``, arrival ``date >= day(start)``."""
    return ((ds.field(s.DATE) >= day_of(start)) & (ds.field(s.TS) >= epoch_ms(start))
            & (ds.field(s.TS) < end_ms))


def _events(paths: Paths) -> ds.Dataset:
    return ds.dataset(paths.events, format="parquet", partitioning=PARTITIONS)


def read_window(paths: Paths, start: datetime, end: datetime, user_ids: list[str],
                name: str = "lake") -> Dataset:
    """The events of ``user_ids`` in ``[start, end)``, items created before ``end`` and those
    users' profiles.

    Only the nightly ranker's and evaluation's sampled request users are read (a cap, not the
    platform's user count); the size is checked against the driver budget before anything is
    loaded. Item features, which need every user's events, read :func:`read_item_events`.

    Returns
    -------
    Dataset
        Frames with exactly :data:`tandem.data.dataset.EVENT_COLUMNS` / ``ITEM_COLUMNS`` /
        ``USER_COLUMNS``; events sorted by (ts, event_id), items by item_id, users by user_id.
    """
    hi = epoch_ms(end)
    who = ds.field(s.USER_ID).isin(pa.array(user_ids, pa.string()))
    window = _window(start, hi) & who
    lake_events = _events(paths)
    within_driver_budget(lake_events.count_rows(filter=window) * EVENT_ROW_BYTES,
                         f"the request users' events of [{start}, {end}) in pandas")
    events = lake_events.to_table(columns=list(EVENT_COLUMNS), filter=window).sort_by(
        [(s.TS, "ascending"), (s.EVENT_ID, "ascending")])
    items = ds.dataset(paths.items, format="parquet").to_table(
        filter=ds.field(s.CREATED_AT) < hi).sort_by(s.ITEM_ID)
    users = ds.dataset(paths.users, format="parquet").to_table(filter=who).sort_by(s.USER_ID)
    return Dataset(conform(events.to_pandas(), EVENT_COLUMNS),
                   conform(items.to_pandas(), ITEM_COLUMNS),
                   conform(users.to_pandas(), USER_COLUMNS), name)


def read_item_events(paths: Paths, start: datetime, end_ms: int, item_ids: pd.Index
                     ) -> ItemEvents:
    """Every event of ``[start, end_ms)`` (the window rule) of an item in ``item_ids`` (the
    bundle's catalog order) as :class:`tandem.data.item_events.ItemEvents`: the item features'
    input.

    Streamed: ``ITEM_EVENT_CHUNK`` rows at a time, the item and type strings of a chunk are coded
    against the catalog and dropped, so no string column (let alone a pandas frame) of the window
    is ever held. Every event's user is in the bundle (the table's user dictionary holds every
    user with an event in the window), so users are not read. Memory: ``ITEM_EVENT_BYTES`` per
    event, checked against the driver budget before the read (the count and the read go through
    one ``Dataset``, i.e. the same files, so the arrays sized by the count hold the read).
    """
    where = _window(start, end_ms)
    data = _events(paths)
    n_rows = data.count_rows(filter=where)
    within_driver_budget(n_rows * ITEM_EVENT_BYTES,
                         f"the item columns of {n_rows:,} events of [{start}, {end_ms} ms)")
    catalog = pa.array(item_ids.to_numpy(object), pa.string())
    types = pa.array(EVENT_CODES.to_numpy(object), pa.string())
    item = np.empty(n_rows, np.int32)
    ts = np.empty(n_rows, np.int64)
    etype = np.empty(n_rows, np.int8)
    value = np.empty(n_rows, np.float64)
    filled = 0

    def code(chunk: list[pa.RecordBatch]) -> None:
        nonlocal filled
        table = pa.Table.from_batches(chunk)
        ids = pc.cast(table[s.ITEM_ID], pa.string())
        codes = pc.fill_null(pc.index_in(ids, value_set=catalog), -1).to_numpy()
        known = codes >= 0  # events of items outside the catalog: no feature asks for them
        end = filled + int(known.sum())
        item[filled:end] = codes[known]
        ts[filled:end] = table[s.TS].to_numpy()[known]
        kinds = pc.cast(table[s.EVENT_TYPE], pa.string())
        etype[filled:end] = pc.fill_null(pc.index_in(kinds, value_set=types), -1).to_numpy()[known]
        value[filled:end] = pc.fill_null(pc.cast(table[s.VALUE], pa.float64()), np.nan)\
            .to_numpy()[known]
        filled = end

    chunk, rows = [], 0
    for batch in data.to_batches(columns=[s.ITEM_ID, s.TS, s.EVENT_TYPE, s.VALUE],
                                 filter=where):
        chunk.append(batch)
        rows += batch.num_rows
        if rows >= ITEM_EVENT_CHUNK:  # one catalog lookup table per chunk, not per small file
            code(chunk)
            chunk, rows = [], 0
    if chunk:
        code(chunk)
    return ItemEvents.sorted(item[:filled], ts[:filled], etype[:filled], value[:filled])


# ----------------------------------------------------------------- the int-coded training table

USER_IDX, ITEM_IDX, OTHER_IDX = "user_idx", "item_idx", "other_idx"
WEIGHT, FIRST_TS, POSITIVE_TS = "weight", "first_ts", "positive_ts"
ENGAGED_TS = "engaged_ts"  # first engagement of the pair (tandem.features.query_history)
POPULARITY, VALUE = "popularity", "value"
USERS_DIR, ITEMS_DIR, INTERACTIONS_DIR, COOC_DIR = "users", "items", "interactions", "cooc"
INTERACTION_COLUMNS = (USER_IDX, ITEM_IDX, WEIGHT, FIRST_TS, s.TS, POSITIVE_TS, ENGAGED_TS)
COOC_COLUMNS = (ITEM_IDX, OTHER_IDX, VALUE)
# bytes per row once a column is in numpy (int32 / float32 / int64)
_NUMPY_BYTES = {USER_IDX: 4, ITEM_IDX: 4, OTHER_IDX: 4, WEIGHT: 4, VALUE: 4, FIRST_TS: 8,
                s.TS: 8, POSITIVE_TS: 8, ENGAGED_TS: 8}


class TrainingTable:
    """The night's int-coded training table (``jobs/build_training_table.py`` writes it).

    Layout under ``lake/training/run_id=<run_id>/`` (parquet folders, any number of files)::

        users/         user_id str, user_idx int32           dense 0..n_users-1, ids sorted
        items/         item_id str, item_idx int32,          dense 0..n_items-1 in catalog order
                       popularity float64, created_at int64  (created_at, item_id)
        interactions/  user_idx int32, item_idx int32,       one row per (user, item) pair with
                       weight float32, first_ts int64,       any event in the window; weight =
                       ts int64, positive_ts int64           capped ALS confidence (0: none),
                       (nullable), engaged_ts int64          first_ts/ts = first/last event,
                       (nullable)                            positive_ts = first positive
                                                             engagement, engaged_ts = first
                                                             engagement (query histories,
                                                             ``tandem.features.query_history``)
        cooc/          item_idx int32, other_idx int32,      top-K co-occurring items per item
                       value float32                         (popularity-normalised)

    The indexes ARE the bundle's rows (``items.parquet``/``users.parquet`` are written from the
    dictionaries), so learners never see a string id. New per-pair columns (labels, negatives,
    context) are added as columns or sibling folders; readers name the columns they need.
    Readers load only those columns with pyarrow and check the size against the driver budget
    first (``tandem.config.within_driver_budget``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, paths: Paths, run_id: str) -> TrainingTable:
        return cls(paths.training(run_id))

    def _dataset(self, folder: str) -> ds.Dataset:
        path = self.root / folder
        if not path.exists():
            raise FileNotFoundError(f"no training table at {path}: run jobs/build_training_table"
                                    " for this run id first")
        return ds.dataset(path, format="parquet")

    def _read(self, folder: str, columns: list[str], filter_=None) -> pa.Table:
        dataset = self._dataset(folder)
        path = self.root / folder
        n_rows = dataset.count_rows(filter=filter_)
        within_driver_budget(n_rows * sum(_NUMPY_BYTES.get(c, 64) for c in columns),
                             f"reading {len(columns)} columns x {n_rows:,} rows of {path}")
        return dataset.to_table(columns=columns, filter=filter_)

    def users(self, columns: list[str] | None = None) -> pa.Table:
        return self._read(USERS_DIR, columns or [s.USER_ID, USER_IDX])

    def items(self, columns: list[str] | None = None) -> pa.Table:
        return self._read(ITEMS_DIR, columns or [s.ITEM_ID, ITEM_IDX])

    def shape(self) -> tuple[int, int]:
        """(n_users, n_items) from the dictionaries' row counts (no data read)."""
        return self._dataset(USERS_DIR).count_rows(), self._dataset(ITEMS_DIR).count_rows()

    def interactions(self, columns: list[str], positives_only: bool = False,
                     engaged_only: bool = False) -> dict[str, np.ndarray]:
        """The named interaction columns as numpy arrays (one row per pair, file order), of
        every pair, or only those with a positive (or any) engagement."""
        filter_ = (ds.field(POSITIVE_TS).is_valid() if positives_only
                   else ds.field(ENGAGED_TS).is_valid() if engaged_only else None)
        table = self._read(INTERACTIONS_DIR, columns, filter_)
        return {c: table.column(c).to_numpy() for c in columns}

    def matrix(self, value: str = WEIGHT) -> sp.csr_matrix:
        """users x items CSR (float32) of ``value`` per pair; pairs with value 0 dropped."""
        cols = self.interactions([USER_IDX, ITEM_IDX, value])
        keep = cols[value] > 0
        matrix = sp.csr_matrix((cols[value][keep].astype(np.float32),
                                (cols[USER_IDX][keep], cols[ITEM_IDX][keep])),
                               shape=self.shape(), dtype=np.float32)
        matrix.sum_duplicates()
        return matrix

    def cooc(self) -> sp.csr_matrix:
        """The top-K co-occurrence as an items x items CSR (float32), zero diagonal."""
        table = self._read(COOC_DIR, list(COOC_COLUMNS))
        n_items = self.shape()[1]
        return sp.csr_matrix((table.column(VALUE).to_numpy().astype(np.float32),
                              (table.column(ITEM_IDX).to_numpy(),
                               table.column(OTHER_IDX).to_numpy())),
                             shape=(n_items, n_items), dtype=np.float32)
