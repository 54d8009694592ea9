"""One query history for serving and training (tandem.features.query_history): the items a serving
request asks the models with are the items the training rows of the same user and time hold."""

import numpy as np
import pandas as pd

from tandem import schema as S
from tandem.data.dataset import (
    EVENT_COLUMNS,
    ITEM_COLUMNS,
    USER_COLUMNS,
    Dataset,
    conform,
)
from tandem.evaluation import night as N
from tandem.evaluation import point_in_time as EP
from tandem.evaluation import protocol as E
from tandem.evaluation import sources as ES
from tandem.features import query_history as QH
from tandem.streaming.session_state import replay, session_row

ITEMS = [f"i{k}" for k in range(10)]
T = 10  # the request time
# (type, item, ts, value): everything but impressions and dislikes enters the history
EVENTS = [(S.IMPRESSION, "i0", 1, None), (S.CLICK, "i1", 2, None), (S.DISLIKE, "i2", 3, None),
          (S.RATING, "i3", 4, 2.0),  # engaged, not positive: in the query all the same
          (S.PLAY, "i4", 5, None), (S.LIKE, "i5", 6, None), (S.IMPRESSION, "i6", 7, None),
          (S.RATING, "i7", 9, 5.0),
          (S.CLICK, "i8", 20, None)]  # after the request: never in its query
AGAIN = (S.CLICK, "i1", 8, None)  # a re-engagement moves i1 to the front


def _events(rows) -> pd.DataFrame:
    frame = pd.DataFrame([{S.EVENT_ID: f"e{n}", S.USER_ID: "u1", S.EVENT_TYPE: e, S.ITEM_ID: i,
                           S.TS: ts, S.VALUE: v} for n, (e, i, ts, v) in enumerate(rows)])
    return conform(frame, EVENT_COLUMNS).sort_values(S.TS, kind="stable").reset_index(drop=True)


def _catalog(events: pd.DataFrame) -> E.Catalog:
    items = conform(pd.DataFrame({S.ITEM_ID: ITEMS, S.GENRES: [["Drama"]] * len(ITEMS),
                                  S.CREATED_AT: 0}), ITEM_COLUMNS)
    users = conform(pd.DataFrame({S.USER_ID: ["u1"], S.SIGNUP_TS: 0}), USER_COLUMNS)
    return E.Catalog.of(Dataset(events, items, users, "t"))


def _served(events: pd.DataFrame, catalog: E.Catalog, session_items=()) -> list[str]:
    """What serving queries with at T: the feature consumer's fold of the events before T into
    the session row, behind the request's own session items (serving.engine's rows)."""
    before = events[events[S.TS] < T].to_dict("records")
    row = session_row("u1", replay(before, {})["u1"])
    ids = list(session_items) + row[S.SESSION_RECENT_ITEMS]
    rows = catalog.item_ids.get_indexer(ids)
    return list(catalog.item_ids[QH.request_history(rows[rows >= 0])])


def test_serving_request_and_training_rows_query_the_same_items():
    events = _events([*EVENTS, AGAIN])
    catalog = _catalog(events)
    served = _served(events, catalog)
    assert served == ["i7", "i1", "i5", "i4", "i3"]
    history = events[events[S.TS] < T]
    # the ranker's training rows (evaluation and nightly): session row and recency items
    raw, recent = EP.session_rows(history, catalog, np.array([0]), n_recent=3)
    assert raw[S.SESSION_RECENT_ITEMS][0] == served
    assert list(catalog.item_ids[recent[0]]) == served[:3]
    # the content source's profile items and the sequence model's query
    inputs = ES.content_inputs(history, catalog, np.zeros(len(ITEMS)), np.array([0]), None)
    assert list(catalog.item_ids[inputs[3][0][inputs[3][0] >= 0]]) == served
    hist = E._indexed(history, catalog)
    query = ES._query_rows(hist, 1, QH.QUERY_LEN)[0]
    assert list(catalog.item_ids[query[query >= 0]]) == served
    # the request's own session items come first, once
    assert _served(events, catalog, ["i9", "i5"]) == ["i9", "i5", "i7", "i1", "i4", "i3"]


def test_the_nights_query_at_the_cut_is_the_served_one():
    """The nightly ranker's and evaluation's two-tower and sequence queries at the cut
    (tandem.evaluation.night.query_histories, from the asked users' pre-cut events) are exactly
    serving's, re-engagements included: i1 clicked again moves to the front."""
    events = _events([*EVENTS, AGAIN])
    catalog = _catalog(events)
    served = _served(events, catalog)
    assert served == ["i7", "i1", "i5", "i4", "i3"]
    pre_cut = events[events[S.TS] < T]
    asked = pd.Index(["u0", "u1"])  # u0 asked, no events: all padding
    got = N.query_histories(pre_cut, asked, catalog.item_ids, QH.QUERY_LEN)
    assert got.shape == (2, QH.QUERY_LEN) and (got[0] == QH.PAD).all()
    assert list(catalog.item_ids[got[1][got[1] >= 0]]) == served


def test_a_training_example_holds_the_query_before_its_target():
    """The two-tower's example history (tandem.features.query_history.histories_before) is the query
    a request at the target's time sees, without the target: i4 was played before it was liked."""
    users = np.zeros(4, np.int64)
    items, ts = np.array([1, 4, 5, 7]), np.array([2, 5, 6, 9])  # engaged pairs, first engagement
    q_items, q_ts = np.array([7, 4, 1]), np.array([9, 12, 2])  # a rating, a like of i4, a click
    got = QH.histories_before(users, items, ts, np.zeros(3, np.int64), q_items, q_ts, 3)
    assert got.tolist() == [[5, 4, 1], [7, 5, 1], [-1, -1, -1]]
    before = ts < 9  # a request at the target's time sees the pairs engaged before it
    at = QH.query_items(users[before], items[before], ts[before], 1, 3)
    np.testing.assert_array_equal(got[0], at[0])
    # ties in time: the higher item first on both paths
    tied = QH.histories_before(np.zeros(3, np.int64), np.array([3, 8, 2]), np.array([1, 1, 1]),
                               np.array([0]), np.array([9]), np.array([2]), 3)
    assert tied.tolist() == [[8, 3, 2]]
    assert QH.query_items(np.zeros(3), np.array([3, 8, 2]), np.array([1, 1, 1]), 1, 3
                          ).tolist() == [[8, 3, 2]]
