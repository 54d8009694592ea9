"""MMR: lambda 1 keeps the ranker's order, lower lambda spreads near-duplicates apart."""

import numpy as np
import pytest

from tandem.policy.diversify import mmr

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


# genres A, B: items 0-2 are A, 3 is B, 4 has none; relevance falls with the index
GENRES = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 0]], dtype=bool)
REL5 = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
VECS5 = np.eye(5)


def test_genre_cap_defers_the_third_of_a_genre():
    assert mmr(REL5, VECS5, 5, lam=1.0).tolist() == [0, 1, 2, 3, 4]
    # cap 2: item 2 (a third A) waits until B and the genre-less item are shown
    assert mmr(REL5, VECS5, 5, lam=1.0, genres=GENRES, max_per_genre=2).tolist() \
        == [0, 1, 3, 4, 2]
    # cap 1: after 0, 3 and 4 nothing is eligible -> the rest by plain MMR (list stays k long)
    assert mmr(REL5, VECS5, 5, lam=1.0, genres=GENRES, max_per_genre=1).tolist() \
        == [0, 3, 4, 1, 2]
    assert mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, max_per_genre=0).tolist() == [0, 1, 2]


def test_genre_cap_blocks_an_item_when_any_of_its_genres_is_full():
    genres = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], dtype=bool)  # item 1 is A and B
    rel = np.array([4.0, 3.0, 2.0, 1.0])
    assert mmr(rel, np.eye(4), 4, lam=1.0, genres=genres, max_per_genre=1).tolist() \
        == [0, 2, 1, 3]


def test_genre_cap_holds_on_a_large_pool():
    rng = np.random.default_rng(0)
    genres = rng.random((300, 19)) < 0.15
    picked = mmr(rng.random(300), rng.standard_normal((300, 16)), 20, lam=0.7, genres=genres,
                 max_per_genre=3)
    assert len(set(picked.tolist())) == 20
    assert genres[picked].sum(axis=0).max() <= 3


def test_rerank_is_mmr_over_the_top_of_the_pool_with_the_shared_defaults():
    """Serving and make eval call rerank: MMR only over the best ``mmr_pool`` by relevance,
    vectors and genres gathered by catalog row; the cap applies when configured."""
    from tandem.policy.diversify import DIVERSIFY_CONFIG, rerank

    rel = np.array([1.0, 3.0, 2.0, 0.5])
    rows = np.array([2, 0, 1, 3])  # catalog rows of the pool
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    genres = np.array([[1, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
    cfg = {**DIVERSIFY_CONFIG, "mmr_pool": 3}
    top = np.array([1, 2, 0])  # pool positions by relevance, the last cut by mmr_pool
    expected = top[mmr(rel[top], vectors[rows[top]], 3, cfg["mmr_lambda"])]
    np.testing.assert_array_equal(rerank(rel, rows, vectors, None, 3, cfg), expected)
    assert 3 not in rerank(rel, rows, vectors, genres, 3, cfg)  # outside the pool
    capped = rerank(rel, rows, vectors, genres, 2, {**cfg, "genre_cap": 1, "mmr_lambda": 1.0})
    # position 1 (row 0, genre 0) first; position 2 (row 1, genre 0, more relevant than
    # position 0) is blocked by the cap, so position 0 (row 2, genre 1) comes second
    np.testing.assert_array_equal(capped, [1, 0])


def test_calibration_brings_the_targets_genres_into_the_list():
    """Steck's calibration: each step pays ``w * KL(target || the list's genre mix)``; a list of
    the ranker's top A items misses the target's B half, so B moves up (the genre-less item
    brings no genre and moves nothing)."""
    target = np.array([0.5, 0.5])
    assert mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, target=target).tolist() == [0, 1, 2]
    # step 2: one more A leaves B out (KL 1.96), the B item (relevance 0.25 vs 0.75) makes
    # the mix (0.5, 0.5) (KL 0); step 3: a second A costs only KL 0.06
    assert mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, target=target,
               calibration=1.0).tolist() == [0, 3, 1]
    # an A-only target asks for nothing the ranker's order does not already give
    assert mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, target=np.array([1.0, 0.0]),
               calibration=1.0).tolist() == [0, 1, 2]
    # no target (or an empty one): calibration is off
    assert mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, target=np.zeros(2),
               calibration=1.0).tolist() == [0, 1, 2]


def test_calibration_moves_a_large_lists_genre_mix_to_the_target():
    rng = np.random.default_rng(1)
    genres = rng.random((100, 6)) < 0.3
    rel = rng.random(100) + 2.0 * genres[:, 0]  # the ranker likes genre 0
    target = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.5])  # the user wants genre 5

    def kl(picked: np.ndarray) -> float:
        q = genres[picked].sum(axis=0) / genres[picked].sum()
        return float((target * np.log(target / np.maximum(q, 1e-3))).sum())

    plain = mmr(rel, np.eye(100), 10, lam=1.0, genres=genres)
    calibrated = mmr(rel, np.eye(100), 10, lam=1.0, genres=genres, target=target,
                     calibration=1.0)
    assert len(set(calibrated.tolist())) == 10
    assert kl(calibrated) < 0.5 * kl(plain)
    assert genres[calibrated, 5].sum() >= genres[plain, 5].sum() + 3


def test_rerank_calibrates_to_the_target_it_is_given():
    from tandem.policy.diversify import DIVERSIFY_CONFIG, rerank

    rows = np.array([4, 3, 2, 1, 0])  # the pool's catalog rows: genres by row, reversed
    catalog_genres = GENRES[::-1].astype(np.float32)
    cfg = {**DIVERSIFY_CONFIG, "mmr_lambda": 1.0, "calibration": 1.0, "intent_floor": 0}
    target = np.array([0.5, 0.5])
    np.testing.assert_array_equal(rerank(REL5, rows, VECS5, catalog_genres, 3, cfg, target),
                                  [0, 3, 1])
    np.testing.assert_array_equal(rerank(REL5, rows, VECS5, catalog_genres, 3,
                                         {**cfg, "calibration": 0.0}, target), [0, 1, 2])
    np.testing.assert_array_equal(rerank(REL5, rows, VECS5, catalog_genres, 3, cfg), [0, 1, 2])


def test_the_intent_floor_fills_only_the_last_slots_a_list_lacks():
    """At least ``intent_floor`` picks carry the target's strongest genre; only the last slots
    change, and a list that already has them is untouched."""
    b_target = np.array([0.0, 1.0])  # the session's newest items agree on B
    plain = mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES)
    assert plain.tolist() == [0, 1, 2]
    # one B item in the pool: the floor of 2 can only be met once; it takes the last slot
    assert mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, target=b_target,
               intent_floor=2).tolist() == [0, 1, 3]
    # an A target: the ranker's top 3 already carry A, nothing moves
    assert mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, target=np.array([1.0, 0.0]),
               intent_floor=3).tolist() == [0, 1, 2]
    # no target, or the floor off: the ranker's order
    assert mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, target=np.zeros(2),
               intent_floor=2).tolist() == [0, 1, 2]
    assert mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, target=b_target,
               intent_floor=0).tolist() == [0, 1, 2]
    # the genre cap wins over a larger floor: cap 1 on an A target keeps one A item
    a_capped = mmr(REL5, VECS5, 3, lam=1.0, genres=GENRES, max_per_genre=1,
                   target=np.array([1.0, 0.0]), intent_floor=3)
    assert GENRES[a_capped, 0].sum() == 1


def test_the_intent_floor_on_a_large_pool_keeps_the_rankers_head():
    rng = np.random.default_rng(3)
    genres = rng.random((100, 6)) < 0.3
    genres[:, 5] = False
    genres[rng.choice(100, 8, replace=False), 5] = True  # a rare genre the ranker ignores
    rel = rng.random(100) - 5.0 * genres[:, 5]
    target = np.eye(6)[5]
    plain = mmr(rel, np.eye(100), 10, lam=0.7, genres=genres)
    floored = mmr(rel, np.eye(100), 10, lam=0.7, genres=genres, target=target, intent_floor=3)
    assert genres[plain, 5].sum() == 0 and genres[floored, 5].sum() == 3
    np.testing.assert_array_equal(floored[:7], plain[:7])  # the head is the ranker's (and MMR's)
    assert len(set(floored.tolist())) == 10


def test_rerank_applies_the_configured_intent_floor():
    from tandem.policy.diversify import DIVERSIFY_CONFIG, rerank

    rows = np.array([4, 3, 2, 1, 0])
    catalog_genres = GENRES[::-1].astype(np.float32)
    cfg = {**DIVERSIFY_CONFIG, "mmr_lambda": 1.0, "calibration": 0.0, "intent_floor": 1}
    b_target = np.array([0.0, 1.0])
    np.testing.assert_array_equal(rerank(REL5, rows, VECS5, catalog_genres, 3, cfg, b_target),
                                  [0, 1, 3])
    np.testing.assert_array_equal(rerank(REL5, rows, VECS5, catalog_genres, 3, cfg), [0, 1, 2])


def test_rerank_similarity_is_genre_sets_or_embeddings_as_configured():
    """``mmr_similarity``: "genre" penalises a second item of the same genre set, "embedding" a
    second item near in the served vectors; items 0 and 1 share genre A, items 0 and 2 share an
    embedding direction."""
    from tandem.policy.diversify import DIVERSIFY_CONFIG, rerank

    rel, rows = np.array([3.0, 2.0, 1.0]), np.arange(3)
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    genres = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    cfg = {**DIVERSIFY_CONFIG, "mmr_lambda": 0.5, "intent_floor": 0}
    # step 2 with genres: item 1 = 0.5 * 0.5 - 0.5 * 1 = -0.25 < item 2 = 0 - 0.5 * 0 = 0
    np.testing.assert_array_equal(
        rerank(rel, rows, vectors, genres, 3, {**cfg, "mmr_similarity": "genre"}), [0, 2, 1])
    # with embeddings: item 1 = 0.25 - 0 = 0.25 > item 2 = 0 - 0.5 * 1 = -0.5
    np.testing.assert_array_equal(
        rerank(rel, rows, vectors, genres, 3, {**cfg, "mmr_similarity": "embedding"}), [0, 1, 2])
    assert DIVERSIFY_CONFIG["mmr_similarity"] == "embedding"
    # no genres known: the embedding is all there is
    np.testing.assert_array_equal(
        rerank(rel, rows, vectors, None, 3, {**cfg, "mmr_similarity": "genre"}), [0, 1, 2])
    with pytest.raises(ValueError, match="mmr_similarity"):
        rerank(rel, rows, vectors, genres, 3, {**cfg, "mmr_similarity": "cosine"})
