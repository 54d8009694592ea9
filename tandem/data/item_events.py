"""The events as the in-process item features count them: four numpy columns, no strings.

Item features (popularity windows, impressions and clicks, rating mean, last event) are
windowed counts over EVERY user's events, so they are the one in-process feature that needs the
whole window. Held as a pandas frame that is ~400 B an event (17 columns, most of them Python
strings); :class:`ItemEvents` keeps only what the counts read -- the item's catalog row, ts, the
event type as a code and the rating's value -- at 21 B an event, sorted once by (item, ts) so
every windowed count is a binary search (``tandem.evaluation.point_in_time.item_rows_at``).

Built from an in-memory frame (:meth:`ItemEvents.of`, the MovieLens evaluation) or streamed
from the lake batch by batch (``tandem.data.lake.read_item_events``, the nightly jobs): both give
the same arrays for the same events, so both paths compute the same features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tandem import schema as S

EVENT_CODES = pd.Index(S.EVENT_TYPES)  # event type -> code (its position); -1 when unknown
IMPRESSION, CLICK, RATING = (EVENT_CODES.get_loc(t) for t in (S.IMPRESSION, S.CLICK, S.RATING))


@dataclass
class ItemEvents:
    """One row per event of an item in the catalog, sorted by (item, ts).

    Attributes
    ----------
    item : int32 [n], the item's catalog row
    ts : int64 [n], epoch ms
    event_type : int8 [n], index into ``schema.EVENT_TYPES`` (-1: a type outside the contract)
    rating : float64 [n], the value of a rating event; 0 for other events and null ratings
    """

    item: np.ndarray
    ts: np.ndarray
    event_type: np.ndarray
    rating: np.ndarray

    @classmethod
    def of(cls, events: pd.DataFrame, item_ids: pd.Index) -> ItemEvents:
        """From an events frame (``tandem.data.dataset.EVENT_COLUMNS``); events of items outside
        ``item_ids`` (the catalog order) are dropped: no item feature asks for them."""
        return cls.sorted(item_ids.get_indexer(events[S.ITEM_ID]),
                          events[S.TS].to_numpy(np.int64),
                          EVENT_CODES.get_indexer(events[S.EVENT_TYPE]),
                          pd.to_numeric(events[S.VALUE], errors="coerce").to_numpy(
                              np.float64, na_value=np.nan))

    @classmethod
    def sorted(cls, item: np.ndarray, ts: np.ndarray, event_type: np.ndarray,
               value: np.ndarray) -> ItemEvents:
        """From unsorted columns (``item`` -1: not in the catalog, dropped; ``value`` NaN where
        null), sorted by (item, ts)."""
        keep = item >= 0
        if not keep.all():
            item, ts, event_type, value = item[keep], ts[keep], event_type[keep], value[keep]
        item, ts = item.astype(np.int32, copy=False), ts.astype(np.int64, copy=False)
        event_type = event_type.astype(np.int8, copy=False)
        rating = np.where((event_type == RATING) & ~np.isnan(value), value, 0.0)
        order = np.lexsort((ts, item))
        return cls(item[order], ts[order], event_type[order], rating[order])

    def __len__(self) -> int:
        return len(self.item)
