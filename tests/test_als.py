"""ALS confidence weights, matrix building, fitting and top-k helpers."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tandem import schema as S
from tandem.models import als as A


def _events(rows):
    return pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.EVENT_TYPE, S.DWELL_MS])


def test_event_confidence_by_type_and_dwell():
    cfg = {**A.ALS_CONFIG, "event_weights": {S.CLICK: 1.0, S.PLAY: 0.5, S.LIKE: 3.0},
           "dwell_weight": 2.0, "dwell_full_ms": 1000}
    ev = _events([("u", "i", S.CLICK, None), ("u", "i", S.PLAY, 500), ("u", "i", S.PLAY, 5000),
                  ("u", "i", S.LIKE, None), ("u", "i", "unknown_type", None),
                  ("u", "i", S.IMPRESSION, None)])
    # click 1; play 0.5 + 2 * 0.5; play 0.5 + 2 * 1 (capped); like 3; unknown 0; impression 0
    assert A.event_confidence(ev, cfg).tolist() == pytest.approx([1.0, 1.5, 2.5, 3.0, 0.0, 0.0])


def test_pair_confidence_sums_caps_and_drops_zero_pairs():
    cfg = {**A.ALS_CONFIG, "max_confidence": 4.0}
    ev = _events([("u", "a", S.LIKE, None), ("u", "a", S.LIKE, None),  # 3 + 3 -> capped 4
                  ("u", "b", S.CLICK, None),  # 1
                  ("v", "a", S.IMPRESSION, None)])  # 0 -> dropped
    pairs = A.pair_confidence(ev, cfg).sort_values([S.USER_ID, S.ITEM_ID])
    assert pairs.values.tolist() == [["u", "a", 4.0], ["u", "b", 1.0]]


def test_confidence_matrix_orders_rows_and_columns_by_the_given_ids():
    pairs = pd.DataFrame({S.USER_ID: ["u2", "u1", "zz"], S.ITEM_ID: ["b", "a", "a"],
                          "confidence": [2.0, 1.0, 9.0]})
    m = A.confidence_matrix(pairs, pd.Index(["u1", "u2"]), pd.Index(["a", "b", "c"]))
    assert m.shape == (2, 3)
    assert m.toarray().tolist() == [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]  # unknown user dropped


def _checkerboard():
    """Users 0-3 like items 0-3, users 4-7 like items 4-7 (one obvious right answer)."""
    rows, cols = [], []
    for u in range(8):
        block = range(0, 4) if u < 4 else range(4, 8)
        for i in block:
            if (u + i) % 4 != 0:  # leave one item per user unseen
                rows.append(u)
                cols.append(i)

    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(8, 8))


def test_fit_als_recommends_the_unseen_item_of_the_users_block():
    m = _checkerboard()
    cfg = {**A.ALS_CONFIG, "factors": 4, "iterations": 20, "regularization": 0.01}
    f = A.fit_als(m, pd.Index([f"u{i}" for i in range(8)]), pd.Index([f"i{i}" for i in range(8)]),
                  cfg)
    top, _ = A.top_k_items(f.scores(np.arange(8)), 1, exclude=m)
    expected = [next(i for i in (range(4) if u < 4 else range(4, 8)) if (u + i) % 4 == 0)
                for u in range(8)]
    assert top[:, 0].tolist() == expected


def test_fit_als_is_deterministic_for_a_seed():
    m = _checkerboard()
    ids = pd.Index([str(i) for i in range(8)])
    cfg = {**A.ALS_CONFIG, "factors": 4, "iterations": 5}
    a, b = A.fit_als(m, ids, ids, cfg), A.fit_als(m, ids, ids, cfg)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)


def test_fold_in_solves_the_user_step_against_fixed_item_factors():
    m = _checkerboard()
    ids = pd.Index([str(i) for i in range(8)])
    cfg = {**A.ALS_CONFIG, "factors": 4, "iterations": 20, "regularization": 0.01}
    f = A.fit_als(m, ids, ids, cfg)
    # a fitted model's last step is the item step: the user step on the same rows lands close
    folded = A.fold_in(f.item_factors, m, cfg)
    np.testing.assert_allclose(folded @ f.item_factors.T, f.scores(np.arange(8)), atol=0.05)
    # a user folded in from one block's items scores that block above the other; stored zeros
    # (impression-only pairs) carry no confidence; an empty row gets a zero vector
    rows = sp.csr_matrix((np.array([1.0, 1.0, 0.0], np.float32), ([0, 0, 1], [0, 1, 5])),
                         shape=(2, 8))
    vec = A.fold_in(f.item_factors, rows, cfg)
    scores = vec[0] @ f.item_factors.T
    assert scores[:4].mean() > scores[4:].mean()
    np.testing.assert_array_equal(vec[1], 0.0)


def test_top_k_items_sorted_and_excluding():

    scores = np.array([[0.1, 0.9, 0.5, 0.7], [1.0, 0.0, 0.2, 0.3]], dtype=np.float32)
    exclude = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    idx, val = A.top_k_items(scores, 2, exclude)
    assert idx.tolist() == [[3, 2], [0, 3]]
    np.testing.assert_allclose(val, [[0.7, 0.5], [1.0, 0.3]], rtol=1e-6)


def test_factors_save_and_load_roundtrip(tmp_path):
    f = A.AlsFactors(pd.Index(["u"]), pd.Index(["a", "b"]), np.ones((1, 2), np.float32),
                     np.arange(4, dtype=np.float32).reshape(2, 2))
    f.save(tmp_path / "als")
    g = A.AlsFactors.load(tmp_path / "als")
    assert list(g.item_ids) == ["a", "b"]
    np.testing.assert_array_equal(g.item_factors, f.item_factors)


def test_fold_in_one_is_the_user_step_of_fold_in_and_a_burst_moves_it():
    m = _checkerboard()
    ids = pd.Index([str(i) for i in range(8)])
    cfg = {**A.ALS_CONFIG, "factors": 4, "iterations": 20}
    f = A.fit_als(m, ids, ids, cfg)
    yty = A.gram(f.item_factors)
    # no prior: exactly implicit's user step (fold_in) for the same row
    row = m.getrow(0)
    one = A.fold_in_one(f.item_factors, yty, row.indices, row.data, cfg)
    np.testing.assert_allclose(one, A.fold_in(f.item_factors, row, cfg)[0], rtol=1e-4, atol=1e-5)
    # no items and no prior -> zero vector; no items with a prior -> the prior itself
    np.testing.assert_array_equal(A.fold_in_one(f.item_factors, yty, [], [], cfg), 0.0)
    x0 = f.user_factors[0]
    np.testing.assert_allclose(A.fold_in_one(f.item_factors, yty, [], [], cfg, prior=x0), x0,
                               rtol=1e-5, atol=1e-6)
    # user 0 lives in block 0-3; a burst on block 4-7 (confidence 4: a click and a like)
    # turns its best items to that block, refolded from its nightly vector
    before = x0 @ f.item_factors.T
    assert before[:4].mean() > before[4:].mean()
    burst = A.fold_in_one(f.item_factors, yty, np.arange(4, 8), np.full(4, 4.0), cfg, prior=x0)
    after = burst @ f.item_factors.T
    assert after[4:].mean() > after[:4].mean()
    assert after[:4].mean() > 0  # the history still counts
