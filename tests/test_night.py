"""tandem.evaluation.night on a hand-written training table: the cut, the user halves, seen items
dropped."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from tandem import schema as S
from tandem.data import lake as L
from tandem.evaluation import night as N

CUT = 1_000


def _table(root, n_users=40, n_items=6) -> L.TrainingTable:
    """Every user: item 0 long before the cut (positive), item 1 shown only, item 2 positive
    after the cut (a label) for even users; item 3 first seen before, engaged after the cut."""
    for folder, cols in (
            (L.USERS_DIR, {S.USER_ID: [f"u{u:02d}" for u in range(n_users)],
                           L.USER_IDX: np.arange(n_users, dtype=np.int32)}),
            (L.ITEMS_DIR, {S.ITEM_ID: [f"i{i}" for i in range(n_items)],
                           L.ITEM_IDX: np.arange(n_items, dtype=np.int32)})):
        (root / folder).mkdir(parents=True)
        pq.write_table(pa.table(cols), root / folder / "part-0.parquet")
    rows = []
    for u in range(n_users):
        rows += [(u, 0, 2.0, 10, 20, 10, 10), (u, 1, 0.0, 30, 30, None, None),
                 (u, 3, 1.0, 500, 1500, 1500, 1500)]
        if u % 2 == 0:
            rows.append((u, 2, 3.0, 1200, 1300, 1200, 1200))
    cols = list(zip(*rows, strict=True))
    table = pa.table({L.USER_IDX: pa.array(cols[0], pa.int32()),
                      L.ITEM_IDX: pa.array(cols[1], pa.int32()),
                      L.WEIGHT: pa.array(cols[2], pa.float32()),
                      L.FIRST_TS: pa.array(cols[3], pa.int64()),
                      S.TS: pa.array(cols[4], pa.int64()),
                      L.POSITIVE_TS: pa.array(cols[5], pa.int64()),
                      L.ENGAGED_TS: pa.array(cols[6], pa.int64())})
    (root / L.INTERACTIONS_DIR).mkdir()
    pq.write_table(table, root / L.INTERACTIONS_DIR / "part-0.parquet")
    return L.TrainingTable(root)


def test_requests_split_users_at_the_cut(tmp_path):
    table = _table(tmp_path)
    ranker = N.requests(table, CUT, N.RANKER)
    evaluation = N.requests(table, CUT, N.EVALUATION)
    # label users: every user engages item 3 after the cut; the halves never share a user
    assert not set(ranker.user_rows) & set(evaluation.user_rows)
    assert sorted([*ranker.user_rows, *evaluation.user_rows]) == list(range(40))
    assert len(ranker.user_rows) > 5 and len(evaluation.user_rows) > 5
    # labels: pairs first engaged positively after the cut (item 3 always, item 2 for even users)
    labels = ranker.labels.sort_values(["user_row", "item"])
    expected = sorted((u, i) for u in ranker.user_rows for i in ((2, 3) if u % 2 == 0 else (3,)))
    assert list(map(tuple, labels.to_numpy())) == expected
    assert ranker.n_label_pairs == 40 + 20
    # history: the pre-cut pairs that are no labels (items 0 and 1); item 1 seen, no weight
    assert ranker.history.shape == (len(ranker.user_rows), 6)
    dense = ranker.history.toarray()
    assert (dense[:, 0] == 2.0).all() and (dense[:, 2:] == 0).all()
    assert ranker.history.nnz == 2 * len(ranker.user_rows)  # the shown item is stored (seen)
    np.testing.assert_array_equal(ranker.popularity, [40, 40, 0, 0, 0, 0])
    # a cap samples the users (seeded: the same sample every run)
    capped = N.requests(table, CUT, N.RANKER, {"max_users": 4})
    assert len(capped.user_rows) == 4 and set(capped.user_rows) <= set(ranker.user_rows)
    again = N.requests(table, CUT, N.RANKER, {"max_users": 4})
    np.testing.assert_array_equal(capped.user_rows, again.user_rows)


def test_drop_seen_keeps_the_best_k_unseen_in_order():
    ids = np.array([[5, 1, 2, 3, 4], [0, 1, -1, -1, -1]])
    scores = -np.arange(5, dtype=np.float32)[None, :].repeat(2, 0)
    seen = sp.csr_matrix((np.ones(2), ([0, 0], [1, 3])), shape=(2, 6))
    top = N._drop_seen(ids, scores, seen, k=2)
    assert top[top["local"] == 0]["item"].tolist() == [5, 2]
    assert top[top["local"] == 0]["rank"].tolist() == [1, 2]
    assert top[top["local"] == 1]["item"].tolist() == [0, 1]  # -1 (no answer) is dropped


def test_reading_over_the_driver_budget_names_the_setting(tmp_path, monkeypatch):
    table = _table(tmp_path)
    monkeypatch.setenv("TANDEM_DRIVER_BUDGET_MB", "0.0001")
    with pytest.raises(MemoryError, match="TANDEM_DRIVER_BUDGET_MB"):
        table.matrix()
