"""The lake as single-machine learners read it, with pyarrow (no Spark): the night's int-coded
training table (:class:`TrainingTable`, the learners' input) and one interval as a
:class:`tandem.dataset.Dataset` (:func:`read_window`).

Models learn from the table only (``jobs/build_training_table.py`` writes it in Spark). The
ranker's and the evaluation's in-process features still need raw events: they read them through
:func:`read_window` (only the sampled request users' events when the feature store serves the
entity features), with the same window rules as the Spark table, so every part of one bundle sees
the same rows:

- events with ``start <= ts < end`` whose arrival partition ``date >= day(start)`` (nothing
  arrives before it happens; late arrivals after ``end`` still count), sorted by (ts, event_id);
- items created before ``end`` (the catalog as it stood at the end of the window);
- every user profile (or the requested users').
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import scipy.sparse as sp

from tandem import schema as s
from tandem.config import Paths, within_driver_budget
from tandem.dataset import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, Dataset, conform

EVENT_ROW_BYTES = 400  # one event row in pandas: 17 columns, most of them Python strings
PARTITIONS = ds.partitioning(pa.schema([(s.DATE, pa.string()), (s.HOUR, pa.int32())]),
                             flavor="hive")


def epoch_ms(t: datetime) -> int:
    """Epoch milliseconds of ``t`` (naive datetimes are UTC)."""
    return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)


def day_of(t: datetime) -> str:
    """The UTC date of ``t`` as the lake's ``date`` partition value (yyyy-MM-dd)."""
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%d")


def read_window(paths: Paths, start: datetime, end: datetime, name: str = "lake",
                user_ids: list[str] | None = None) -> Dataset:
    """Events of ``[start, end)``, items created before ``end`` and all profiles.

    ``user_ids`` restricts events and profiles to those users (the nightly ranker and evaluation
    read only their sampled request users' rows); the size is checked against the driver budget
    before anything is loaded.

    Returns
    -------
    Dataset
        Frames with exactly :data:`tandem.dataset.EVENT_COLUMNS` / ``ITEM_COLUMNS`` /
        ``USER_COLUMNS``; events sorted by (ts, event_id), items by item_id, users by user_id.
    """
    lo, hi = epoch_ms(start), epoch_ms(end)
    window = (ds.field(s.DATE) >= day_of(start)) & (ds.field(s.TS) >= lo) & (ds.field(s.TS) < hi)
    who = None if user_ids is None else ds.field(s.USER_ID).isin(pa.array(user_ids, pa.string()))
    lake_events = ds.dataset(paths.events, format="parquet", partitioning=PARTITIONS)
    window = window if who is None else window & who
    within_driver_budget(lake_events.count_rows(filter=window) * EVENT_ROW_BYTES,
                         f"the events of [{start}, {end}) in pandas")
    events = lake_events.to_table(columns=list(EVENT_COLUMNS), filter=window).sort_by(
        [(s.TS, "ascending"), (s.EVENT_ID, "ascending")])
    items = ds.dataset(paths.items, format="parquet").to_table(
        filter=ds.field(s.CREATED_AT) < hi).sort_by(s.ITEM_ID)
    users = ds.dataset(paths.users, format="parquet").to_table(filter=who).sort_by(s.USER_ID)
    return Dataset(conform(events.to_pandas(), EVENT_COLUMNS),
                   conform(items.to_pandas(), ITEM_COLUMNS),
                   conform(users.to_pandas(), USER_COLUMNS), name)


# ----------------------------------------------------------------- the int-coded training table

USER_IDX, ITEM_IDX, OTHER_IDX = "user_idx", "item_idx", "other_idx"
WEIGHT, FIRST_TS, POSITIVE_TS = "weight", "first_ts", "positive_ts"
ENGAGED_TS = "engaged_ts"  # first engagement of the pair (tandem.query_history)
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
                                                             ``tandem.query_history``)
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
