"""The ranker's feature matrix: layout, missing sources, recency and co-occurrence values."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tandem.features import entity as F
from tandem.features import ranking_features as RF


def _space():
    # items 0, 1 point the same way; item 2 is orthogonal; item 3 has a zero vector
    vectors = np.array([[1, 0], [2, 0], [0, 3], [0, 0]], dtype=np.float32)
    # users: u0 took items 0, 1; u1 took 0, 2; u2 took 2
    inter = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]], np.float32))
    return RF.ItemSpace(RF.unit_rows(vectors), RF.cooccurrence(inter))


def test_cooccurrence_is_popularity_normalised_with_zero_diagonal():
    c = _space().cooc.toarray()
    # pop = [2, 1, 2, 0]; co(0,1) = 1 -> 1/sqrt(2*1); co(0,2) = 1 -> 1/sqrt(2*2); co(1,2) = 0
    assert c[0, 1] == pytest.approx(1 / np.sqrt(2))
    assert c[0, 2] == pytest.approx(0.5)
    assert c[1, 2] == 0.0
    assert np.diag(c).tolist() == [0.0] * 4
    np.testing.assert_allclose(c, c.T)


def test_recency_features_values_and_empty_history():
    space = _space()
    recent = np.array([[1, 2, RF.PAD], [RF.PAD, RF.PAD, RF.PAD]])
    out = RF.recency_features(np.array([0, 0]), np.array([0, 1]), recent, space)
    # candidate 0 vs recent [1 (cos 1, cooc 0.7071), 2 (cos 0, cooc 0.5)]
    np.testing.assert_allclose(out[0], [1.0, 0.5, 1.0, 1 / np.sqrt(2), (1 / np.sqrt(2) + 0.5) / 2],
                               rtol=1e-6)
    assert np.isnan(out[1]).all()


@pytest.mark.parametrize("row", [[5, 17, 250, RF.PAD, RF.PAD], [9, 8, 7, 6, 5], [42] + [RF.PAD] * 4,
                                 [RF.PAD] * 5])
def test_recency_features_one_user_path_matches_batch_path_bit_for_bit(row):
    """Serving (one user, broadcast) and training (a batch of users) must not skew."""
    rng = np.random.default_rng(3)
    vectors = RF.unit_rows(rng.normal(size=(300, 64)).astype(np.float32))
    cooc = sp.random(300, 300, density=0.2, format="csr", dtype=np.float32, random_state=4)
    space = RF.ItemSpace(vectors, cooc)
    items = rng.integers(0, 300, 500)
    recent = np.array([row, [1, 2, 3, RF.PAD, RF.PAD]])
    serving = RF.recency_features(items, np.zeros(500, dtype=np.int64), recent[:1], space)
    batch = RF.recency_features(np.concatenate([items, items]),
                                np.repeat([0, 1], 500), recent, space)
    assert np.array_equal(serving, batch[:500], equal_nan=True)
    assert np.isnan(serving).all() == (row[0] == RF.PAD)
    if row[0] != RF.PAD:
        assert (serving[:, 3] > 0).any()  # co-occurrences were found, not only zeros


def test_recency_features_in_chunks_equal_one_gather(monkeypatch):
    """Training rows are gathered a chunk at a time (bounded memory); chunk boundaries change no
    bit, NaN rows included."""
    rng = np.random.default_rng(3)
    vectors = RF.unit_rows(rng.normal(size=(300, 16)).astype(np.float32))
    space = RF.ItemSpace(vectors, sp.random(300, 300, density=0.05, format="csr",
                                             dtype=np.float32, random_state=3))
    recent = rng.integers(0, 300, size=(40, 5))
    recent[rng.random(recent.shape) < 0.3] = RF.PAD
    recent[0] = RF.PAD  # a user without recent items: NaN row
    items, users = rng.integers(0, 300, 1000), rng.integers(0, 40, 1000)
    whole = RF.recency_features(items, users, recent, space)
    monkeypatch.setattr(RF, "_RECENCY_CHUNK", 7)
    chunked = RF.recency_features(items, users, recent, space)
    assert np.isnan(whole[users == 0]).all() and not np.isnan(whole[users != 0, 1]).any()
    np.testing.assert_array_equal(chunked, whole)


def test_device_codes():
    codes = RF.device_codes(np.array(["web", None, "tv", "fridge", ""], dtype=object))
    assert codes.tolist() == [1.0, 0.0, 4.0, 5.0, 0.0]


def _build(sources):
    n_users = 2
    user_rows = np.array([0, 0, 1])
    items = np.array([0, 2, 1])
    users = F.user_matrix(pd.DataFrame({"user_id": ["a", "b"]}), 0)
    users[:, F.USER_AFFINITY_SLICE] = 0.0
    users[0, F.USER_AFFINITY_SLICE.start + F.GENRE_VOCAB.index("Action")] = 1.0
    item_rows = pd.DataFrame({"item_genres": [["Action"], ["Drama"], ["Action", "Drama"]]})
    items_mat = F.item_matrix(item_rows, 0)
    session = F.session_matrix(pd.DataFrame({"user_id": ["a", "b"]}), 0)
    recent = np.array([[1, RF.PAD], [RF.PAD, RF.PAD]])
    return RF.build_features(user_rows, items, sources, users, items_mat, session,
                             np.array([13.0, 2.0]), np.array([1.0, 0.0]), recent, _space()), \
        n_users


def test_build_features_layout_and_missing_sources():
    sources = {"als_score": np.array([0.5, np.nan, 0.1]), "als_rank": np.array([1, np.nan, 2]),
               "two_tower_score": np.array([np.nan, 0.3, 0.2]),
               "two_tower_rank": np.array([np.nan, 1, 2])}
    X, _ = _build(sources)
    names = list(RF.FEATURE_NAMES)
    assert X.shape == (3, len(names)) and X.dtype == np.float32
    col = {n: X[:, names.index(n)] for n in names}
    np.testing.assert_allclose(col["als_score"], [0.5, np.nan, 0.1])
    assert np.isnan(col["popularity_score"]).all()  # source not given at all
    assert col["n_sources"].tolist() == [1.0, 1.0, 2.0]
    # user a likes Action only: item 0 (Action) 1.0, item 2 (Drama) 0; user b has no affinity
    assert col["genre_affinity_cross"].tolist() == [1.0, 0.0, 0.0]
    assert col["ctx_hour"].tolist() == [13.0, 13.0, 2.0]
    assert col["ctx_device_code"].tolist() == [1.0, 1.0, 0.0]
    # user a's recent item is 1: same direction as item 0 (cos 1), orthogonal to item 2
    np.testing.assert_allclose(col["recent_cos_max"][:2], [1.0, 0.0], atol=1e-6)
    assert np.isnan(col["recent_cos_max"][2])  # user b has no recent items


def test_build_features_is_row_independent():
    """Serving ranks one user's candidates alone; rows must not depend on other rows."""
    sources = {"als_score": np.array([0.5, 0.2, 0.1]), "als_rank": np.array([1.0, 2.0, 3.0])}
    X, _ = _build(sources)
    sub = RF.build_features(np.array([0]), np.array([2]),
                            {"als_score": np.array([0.2]), "als_rank": np.array([2.0])},
                            *_build_inputs())
    np.testing.assert_array_equal(sub[0], X[1])


def _build_inputs():
    users = F.user_matrix(pd.DataFrame({"user_id": ["a", "b"]}), 0)
    users[:, F.USER_AFFINITY_SLICE] = 0.0
    users[0, F.USER_AFFINITY_SLICE.start + F.GENRE_VOCAB.index("Action")] = 1.0
    items_mat = F.item_matrix(pd.DataFrame({"item_genres": [["Drama"]]}), 0)
    session = F.session_matrix(pd.DataFrame({"user_id": ["a", "b"]}), 0)
    recent = np.array([[1, RF.PAD], [RF.PAD, RF.PAD]])
    return (users, items_mat, session, np.array([13.0, 2.0]), np.array([1.0, 0.0]), recent,
            _space())


@pytest.mark.parametrize("n_cols", [1, 5, 400])  # column slices (<= 256 distinct) and scipy
def test_cooc_values_are_the_stored_values(n_cols):
    rng = np.random.default_rng(n_cols)
    cooc = RF.cooccurrence(sp.random(300, 500, density=0.02, random_state=1, format="csr"))
    space = RF.ItemSpace(np.zeros((500, 2), np.float32), cooc)
    rows = rng.integers(0, 500, 2000)
    cols = rng.choice(rng.choice(500, n_cols, replace=False), 2000)
    got = space.cooc_values(rows, cols)
    assert got.dtype == np.float32 and (got > 0).any()
    np.testing.assert_array_equal(got, np.asarray(cooc[rows, cols]).ravel())
    empty = RF.ItemSpace(space.unit_vectors, sp.csr_matrix((500, 500), dtype=np.float32))
    assert not empty.cooc_values(rows, cols).any()


def test_sequence_affinity_is_the_sources_score_for_every_candidate():
    """h_user . E[item] for every candidate (NaN: no model, no history, an item newer than the
    model); one request and a batch give the same values."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((6, 4)).astype(np.float32)
    queries = np.vstack([rng.standard_normal(4), np.zeros(4)]).astype(np.float32)
    items, users = np.array([0, 5, 2, 7, 1]), np.array([0, 0, 0, 0, 1])
    out = RF.sequence_affinity(items, users, (queries, vectors))
    np.testing.assert_allclose(out[:3], vectors[[0, 5, 2]] @ queries[0], rtol=1e-6)
    assert np.isnan(out[3]) and np.isnan(out[4])  # item 7 has no vector; user 1 no history
    one = RF.sequence_affinity(items[:4], np.zeros(4, np.int64), (queries[:1], vectors))
    np.testing.assert_array_equal(one[:3], out[:3])
    assert np.isnan(RF.sequence_affinity(items, users, None)).all()
    # build_features puts it in its named column; sequence_rows maps candidates to queries
    n_items = 8
    space = RF.ItemSpace(np.zeros((n_items, 2), np.float32),
                         sp.csr_matrix((n_items, n_items), dtype=np.float32))
    x = RF.build_features(np.arange(5), items, {}, np.zeros((5, len(F.USER_FEATURES))),
                          np.zeros((5, len(F.ITEM_FEATURES))),
                          np.zeros((5, len(F.SESSION_FEATURES))), np.zeros(5), np.zeros(5),
                          np.full((5, RF.N_RECENT), RF.PAD), space, (queries, vectors),
                          sequence_rows=users)
    np.testing.assert_array_equal(x[:, RF.FEATURE_NAMES.index("sequence_affinity")], out)
    assert "content_score" in RF.FEATURE_NAMES and "content_rank" in RF.FEATURE_NAMES


def _hstacked(user_rows, items, sources, users, item_m, session_m, hour, device, recent, space):
    """build_features as it was before it wrote into one matrix: its blocks concatenated
    (float64 where any block is) and cast to float32 once; the reference for the bits."""
    n = len(items)
    src = np.column_stack([np.asarray(sources.get(name, np.full(n, np.nan)), dtype=np.float32)
                           for name in RF.SOURCE_FEATURES[:-1]])
    n_sources = (~np.isnan(src[:, 0::2])).sum(axis=1, dtype=np.float32)[:, None]
    per_user = users[user_rows]
    cross = F.genre_affinity_cross(per_user[:, F.USER_AFFINITY_SLICE],
                                   item_m[:, F.ITEM_GENRE_SLICE])
    return np.hstack([src, n_sources, per_user, item_m, session_m[user_rows], cross[:, None],
                      hour[user_rows, None], device[user_rows, None],
                      RF.sequence_affinity(items, user_rows, None)[:, None],
                      RF.recency_features(items, user_rows, recent, space)]).astype(np.float32)


@pytest.mark.parametrize("n_users", [1, 3])  # one request (broadcast rows) and a batch
def test_build_features_bits_equal_one_cast_of_the_concatenated_blocks(n_users):
    """Writing each block into the float32 matrix rounds exactly as one cast of the float64
    concatenation did: same bits, so a ranker scores old and new matrices identically."""
    rng = np.random.default_rng(n_users)
    n, n_items = 400, 300
    space = RF.ItemSpace(RF.unit_rows(rng.normal(size=(n_items, 8)).astype(np.float32)),
                         sp.random(n_items, n_items, density=0.1, format="csr", dtype=np.float32,
                                   random_state=5))
    user_rows = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    sources = {"als_score": np.where(rng.random(n) < 0.5, rng.normal(size=n), np.nan),  # f64
               "als_rank": rng.integers(1, 500, n).astype(np.float64),
               "content_score": rng.random(n).astype(np.float32)}
    users = rng.normal(size=(n_users, len(F.USER_FEATURES)))  # float64, like user_matrix's math
    item_m = rng.normal(size=(n, len(F.ITEM_FEATURES))).astype(np.float32)
    item_m[:, F.ITEM_GENRE_SLICE] = rng.random((n, F.N_GENRES)) < 0.2
    session_m = rng.normal(size=(n_users, len(F.SESSION_FEATURES))).astype(np.float32)
    hour = rng.integers(0, 24, n_users).astype(np.float32)
    device = rng.integers(0, 5, n_users).astype(np.float64)
    recent = rng.integers(0, n_items, (n_users, RF.N_RECENT))
    recent[-1, 2:] = RF.PAD
    args = (user_rows, items, sources, users, item_m, session_m, hour, device, recent, space)
    got = RF.build_features(*args)
    want = _hstacked(*args)
    assert got.dtype == np.float32 and got.shape == (n, len(RF.FEATURE_NAMES))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isnan(got).any() and not np.isnan(got[:, RF.FEATURE_NAMES.index("n_sources")]).any()
