"""MMR: lambda 1 keeps the ranker's order, lower lambda spreads near-duplicates apart."""

import numpy as np

from tandem.diversify import mmr

# items 0 and 1 are the same direction; 2 points elsewhere; relevance 3 > 2 > 1
VECS = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
REL = np.array([3.0, 2.0, 1.0])


def test_lambda_one_is_ranker_order():
    assert mmr(REL, VECS, 3, lam=1.0).tolist() == [0, 1, 2]


def test_default_lambda_demotes_duplicate():
    # step 2: item 1 = 0.7*0.5 - 0.3*1 = 0.05; item 2 = 0.7*0 - 0.3*0 = 0 -> item 1 still wins
    assert mmr(REL, VECS, 3, lam=0.7).tolist() == [0, 1, 2]
    # at lambda 0.5: item 1 = 0.25 - 0.5 = -0.25 < item 2 = 0 -> the orthogonal item is next
    assert mmr(REL, VECS, 3, lam=0.5).tolist() == [0, 2, 1]


def test_k_larger_than_pool_and_empty():
    assert sorted(mmr(REL, VECS, 10).tolist()) == [0, 1, 2]
    assert mmr(np.zeros(0), np.zeros((0, 2)), 5).tolist() == []


def test_no_repeats_and_zero_vectors():
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((50, 8))
    vecs[:5] = 0.0
    picked = mmr(rng.random(50), vecs, 20, lam=0.3)
    assert len(set(picked.tolist())) == 20
