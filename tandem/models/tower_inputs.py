"""What the two-tower model trains on, in the bundle's order: the run's positive pairs (the
targets), its engaged pairs (the query histories), the catalog's content columns and the users'
profile columns, read with pyarrow; and the fit itself.

Shared by the nightly trainer (``jobs/train_two_tower.py``) and the tuning study
(``jobs/tune.py``), so a trial trains exactly the model the trainer will, on fewer pairs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from tandem import schema as s
from tandem.config import Paths
from tandem.data.lake import ENGAGED_TS, ITEM_IDX, POSITIVE_TS, USER_IDX, TrainingTable, epoch_ms
from tandem.features.tower_features import ItemContentSpec, UserFeatureSpec

TRAIN_CONFIG: dict[str, Any] = {
    "two_tower": {},  # TwoTowerConfig overrides
    "user_fields": (s.AGE_BUCKET, s.GENDER, s.OCCUPATION, s.COUNTRY),
    "n_query_sample": 400,  # user vectors saved to tune and measure the main ANN index
}
ITEM_FIELDS = (s.ITEM_ID, s.GENRES, s.RELEASE_YEAR)


def tower_pairs(table: TrainingTable) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(positive pairs, engaged pairs) of the table, each (user_idx, item_idx, ts): the
    towers' training pairs (ts = the first positive engagement) and what the query histories
    are made of (ts = the first engagement, ``tandem.features.query_history``). One read: a positive
    pair is always an engaged one."""
    cols = table.interactions([USER_IDX, ITEM_IDX, POSITIVE_TS, ENGAGED_TS], engaged_only=True)
    engaged = pd.DataFrame({"user_idx": cols[USER_IDX], "item_idx": cols[ITEM_IDX],
                            "ts": cols[ENGAGED_TS]})
    positive_ts = pd.array(cols[POSITIVE_TS], dtype="Int64")
    has = ~positive_ts.isna()
    positive = pd.DataFrame({"user_idx": cols[USER_IDX][has], "item_idx": cols[ITEM_IDX][has],
                             "ts": positive_ts[has].to_numpy(np.int64)})
    return positive, engaged


def catalog_frames(paths: Paths, end: datetime, table: TrainingTable,
                   user_fields: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(catalog content rows, profiles), both in the table's (the bundle's) row order."""
    item_ids = pd.Index(table.items([s.ITEM_ID, ITEM_IDX]).sort_by(ITEM_IDX)
                        .column(s.ITEM_ID).to_pandas(), name=s.ITEM_ID)
    items = ds.dataset(paths.items, format="parquet").to_table(
        columns=list(ITEM_FIELDS), filter=ds.field(s.CREATED_AT) < epoch_ms(end)).to_pandas()
    items = items.drop_duplicates(s.ITEM_ID).set_index(s.ITEM_ID).reindex(item_ids)
    user_ids = pd.Index(table.users([s.USER_ID, USER_IDX]).sort_by(USER_IDX)
                        .column(s.USER_ID).to_pandas(), name=s.USER_ID)
    present = ds.dataset(paths.users, format="parquet").schema.names
    users = ds.dataset(paths.users, format="parquet").to_table(
        columns=[s.USER_ID, *(f for f in user_fields if f in present)]).to_pandas()
    users = (users.assign(**{s.USER_ID: users[s.USER_ID].astype(str)})
             .drop_duplicates(s.USER_ID).set_index(s.USER_ID).reindex(user_ids))
    return items, users


def fit_tower(pairs: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame,
              cfg: dict[str, Any], history: pd.DataFrame | None = None):
    """Train on the positive pairs and return the model (``tandem.models.two_tower.TwoTowerModel``);
    ``cfg`` is :data:`TRAIN_CONFIG`-shaped (``two_tower``: TwoTowerConfig overrides);
    ``history``: the engaged pairs the query histories come from (:func:`engaged_pairs`; None:
    the positive pairs themselves)."""
    from tandem.models.two_tower import TwoTowerConfig, train_two_tower

    genres = [g if isinstance(g, (list, np.ndarray)) else [] for g in items[s.GENRES]]
    item_spec = ItemContentSpec.fit(genres)
    content = item_spec.encode(genres, items[s.RELEASE_YEAR].tolist())
    fields = [f for f in cfg["user_fields"] if f in users.columns]
    user_spec = UserFeatureSpec.fit(users, fields)
    return train_two_tower(pairs, content, user_spec.encode(users.reset_index()),
                           TwoTowerConfig(**cfg["two_tower"]), n_users=len(users),
                           item_spec=item_spec, user_spec=user_spec, history=history)
