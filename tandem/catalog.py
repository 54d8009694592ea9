"""A bundle's catalog order: which dense row every item and user id gets.

Every item array of a bundle (ALS factors, two-tower vectors, index ids) is indexed by the row of
``items.parquet``; user arrays by ``users.parquet``. The first training job of a nightly run
writes both files into the bundle directory and later jobs of the same run READ them, so all
parts agree. Items are ordered by (created_at, item_id): a later catalog mostly appends, and the
order is a pure function of the lake at the run's end time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tandem import schema as s
from tandem.bundle import ITEMS, USERS
from tandem.config import Paths


def run_bundle_dir(paths: Paths, end: datetime, run_id: str | None = None) -> Path:
    """The bundle directory of the nightly run ending at ``end``: ``<models>/<run_id>``, where
    ``run_id`` defaults to the end date as YYYYMMDD (the DAG's ``--run-id``)."""
    return paths.models / (run_id or end.astimezone(UTC).strftime("%Y%m%d"))


def catalog_items(items: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """``item_id, popularity, created_at`` in catalog order.

    Parameters
    ----------
    items : catalog rows (contract item.v1 columns; only those already created are passed)
    events : the training window's events; popularity = distinct users per item in it
    """
    pop = events.groupby(s.ITEM_ID)[s.USER_ID].nunique()
    out = pd.DataFrame({s.ITEM_ID: items[s.ITEM_ID].astype(str).to_numpy(),
                        s.CREATED_AT: items[s.CREATED_AT].to_numpy(np.int64)})
    out = out.drop_duplicates(s.ITEM_ID).sort_values([s.CREATED_AT, s.ITEM_ID], kind="stable")
    out["popularity"] = out[s.ITEM_ID].map(pop).fillna(0).to_numpy(np.float64)
    return out[[s.ITEM_ID, "popularity", s.CREATED_AT]].reset_index(drop=True)


def catalog_users(users: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """``user_id`` of profiled users and users with events, sorted by id."""
    ids = pd.concat([users[s.USER_ID], events[s.USER_ID]]).astype(str).unique()
    return pd.DataFrame({s.USER_ID: np.sort(ids)})


def load_or_write(bundle_dir: Path, items: pd.DataFrame, users: pd.DataFrame,
                  events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The bundle's (items, users) frames: read if this run already wrote them, else written."""
    bundle_dir = Path(bundle_dir)
    frames = []
    for rel, build in ((ITEMS, lambda: catalog_items(items, events)),
                       (USERS, lambda: catalog_users(users, events))):
        path = bundle_dir / rel
        if path.exists():
            frames.append(pd.read_parquet(path))
        else:
            frame = build()
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
            frames.append(frame)
    return frames[0], frames[1]
