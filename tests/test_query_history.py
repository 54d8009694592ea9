"""One query history for serving and training (tandem.features.query_history): the items a serving
request asks the models with are the items the training rows of the same user and time hold."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tandem import schema as S
from tandem.data import lake as L
from tandem.data.dataset import (
    EVENT_COLUMNS,
    ITEM_COLUMNS,
    USER_COLUMNS,
    Dataset,
    conform,
    positives,
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


def _table(root, events: pd.DataFrame, catalog: E.Catalog) -> L.TrainingTable:
    """The pairs of the events as jobs/build_training_table aggregates them."""
    hist = E._indexed(events, catalog)
    hist = hist.assign(pos=positives(hist, None), eng=QH.is_engagement(hist[S.EVENT_TYPE]))
    pairs = hist.groupby(["user_idx", "item_idx"]).apply(lambda g: pd.Series({
        L.FIRST_TS: g[S.TS].min(), S.TS: g[S.TS].max(),
        L.POSITIVE_TS: g.loc[g["pos"], S.TS].min(), L.ENGAGED_TS: g.loc[g["eng"], S.TS].min()}),
        include_groups=False).reset_index()
    for folder, cols in ((L.USERS_DIR, {S.USER_ID: ["u1"], L.USER_IDX: pa.array([0], pa.int32())}),
                         (L.ITEMS_DIR, {S.ITEM_ID: ITEMS,
                                        L.ITEM_IDX: pa.array(range(len(ITEMS)), pa.int32())})):
        (root / folder).mkdir(parents=True)
        pq.write_table(pa.table(cols), root / folder / "part-0.parquet")
    table = pa.table({L.USER_IDX: pa.array(pairs["user_idx"], pa.int32()),
                      L.ITEM_IDX: pa.array(pairs["item_idx"], pa.int32()),
                      L.WEIGHT: pa.array(np.ones(len(pairs)), pa.float32()),
                      **{c: pa.array(pairs[c].astype("Int64"), pa.int64())
                         for c in (L.FIRST_TS, S.TS, L.POSITIVE_TS, L.ENGAGED_TS)}})
    (root / L.INTERACTIONS_DIR).mkdir()
    pq.write_table(table, root / L.INTERACTIONS_DIR / "part-0.parquet")
    return L.TrainingTable(root)


def test_the_nights_query_from_the_table_is_the_served_one(tmp_path):
    """The nightly ranker's two-tower and sequence queries at the cut (tandem.evaluation.night) come
    from the table's engaged_ts; without re-engagements they are exactly serving's."""
    events = _events(EVENTS)
    catalog = _catalog(events)
    served = _served(events, catalog)
    assert served == ["i7", "i5", "i4", "i3", "i1"]
    table = _table(tmp_path, events, catalog)
    for role in (N.RANKER, N.EVALUATION):  # the user is a label user (i8) of one half
        req = N.requests(table, T, role)
        if len(req.user_rows):
            got = req.recent[0]
    assert list(catalog.item_ids[got[got >= 0]]) == served


def test_a_training_example_holds_the_query_before_its_target():
    """The two-tower's example history (tandem.features.query_history.histories_before) is the query
    a request at the target's time sees, without the target: i4 was played before it was liked."""
    users = np.zeros(4, np.int64)
    items, ts = np.array([1, 4, 5, 7]), np.array([2, 5, 6, 9])  # engaged pairs, first engagement
    q_items, q_ts = np.array([7, 4, 1]), np.array([9, 12, 2])  # a rating, a like of i4, a click
    got = QH.histories_before(users, items, ts, np.zeros(3, np.int64), q_items, q_ts, 3)
    assert got.tolist() == [[5, 4, 1], [7, 5, 1], [-1, -1, -1]]
    at = QH.query_items(users, items, ts, 1, 3, at_ms=np.array([9]))
    np.testing.assert_array_equal(got[0], at[0])
    # ties in time: the higher item first on both paths
    tied = QH.histories_before(np.zeros(3, np.int64), np.array([3, 8, 2]), np.array([1, 1, 1]),
                               np.array([0]), np.array([9]), np.array([2]), 3)
    assert tied.tolist() == [[8, 3, 2]]
    assert QH.query_items(np.zeros(3), np.array([3, 8, 2]), np.array([1, 1, 1]), 1, 3
                          ).tolist() == [[8, 3, 2]]
