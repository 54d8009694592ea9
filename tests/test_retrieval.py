"""Candidate merge: union, dedupe, per-source scores and bits, exclusions, FAISS padding."""

import numpy as np

from tandem.policy.retrieval import (
    SOURCE_BITS,
    GenreLists,
    content_candidates,
    genre_top_rows,
    merge,
    session_intent,
    source_names,
)


def test_merge_dedupes_and_keeps_every_source():
    pool = merge([("two_tower", np.array([5, 3, -1, 9]), np.array([0.9, 0.8, 0.0, 0.1])),
                  ("als", np.array([3, 7]), np.array([2.0, 1.0])),
                  ("popularity", np.array([9, 10]), np.array([1.0, 1.0]))],
                 exclude=np.array([7]), n_items=10)
    assert pool.rows.tolist() == [3, 5, 9]  # -1 padding, excluded 7 and out-of-range 10 dropped
    assert source_names(int(pool.source_mask[0])) == ["two_tower", "als"]
    assert pool.source_mask[2] == SOURCE_BITS["two_tower"] | SOURCE_BITS["popularity"]
    assert pool.scores[0, 1] == 2.0 and np.isnan(pool.scores[1, 1])
    assert pool.count_by_source()["two_tower"] == 3
    assert pool.take(np.array([1])).rows.tolist() == [5]


def test_merge_empty():
    pool = merge([], np.zeros(0, dtype=np.int64), 10)
    assert len(pool) == 0 and pool.scores.shape == (0, len(SOURCE_BITS))


def test_content_candidates_rank_by_genre_match_then_popularity():
    # genres: 0 Horror, 1 Comedy, 2 Drama; 6 items
    genres = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]], bool)
    popularity = np.array([5.0, 9.0, 8.0, 7.0, 6.0, 1.0], np.float32)
    by_pop = np.argsort(-popularity, kind="stable")
    genre_top = np.full((3, 4), -1)
    for g in range(3):
        hits = by_pop[genres[by_pop, g]][:4]
        genre_top[g, : len(hits)] = hits
    # a Horror-only profile: pure Horror items first (popular first), then the Horror|Comedy one
    rows, scores = content_candidates(genre_top, genres, popularity, np.array([1.0, 0, 0]), 10)
    assert rows.tolist() == [4, 0, 1]
    np.testing.assert_allclose(scores, [1.0, 1.0, 1 / np.sqrt(2)], rtol=1e-6)
    # mostly Comedy with some Horror: Comedy-only items lead; n caps; Drama-only items never come
    rows, _ = content_candidates(genre_top, genres, popularity, np.array([0.3, 1.0, 0]), 3)
    assert rows.tolist() == [2, 1, 5]
    rows, _ = content_candidates(genre_top, genres, popularity, np.array([0.3, 1.0, 0]), 10)
    assert rows.tolist() == [2, 1, 5, 4, 0]
    # an empty profile retrieves nothing
    assert len(content_candidates(genre_top, genres, popularity, np.zeros(3), 10)[0]) == 0


def test_genre_lists_give_content_candidates_rows_and_scores():
    """Serving's per-model GenreLists (each genre's list gathered once) return exactly what
    content_candidates computes from the catalog arrays, ties in popularity included."""
    rng = np.random.default_rng(0)
    genres = rng.random((5000, 19)) < 0.15
    popularity = np.round(rng.random(5000), 2).astype(np.float32)  # many ties
    lists = GenreLists.build(genres, popularity, m=50)
    genre_top = genre_top_rows(genres, popularity, m=50)
    profiles = [np.where(rng.random(19) < 0.3, rng.random(19), 0.0).astype(np.float32)
                for _ in range(50)] + [np.zeros(19, np.float32), np.eye(19, dtype=np.float32)[4]]
    for profile in profiles:
        want = content_candidates(genre_top, genres, popularity, profile, 60)
        got = lists.candidates(profile, 60)
        assert np.array_equal(got[0], want[0])
        assert np.array_equal(got[1].view(np.uint32), want[1].view(np.uint32))
    assert len(lists.candidates(profiles[0], 60)[0]) == 60
    assert len(lists.candidates(profiles[-2], 60)[0]) == 0  # empty profile


def test_session_intent_is_the_genres_most_newest_items_share():
    # genres: 0 Horror, 1 Comedy, 2 Drama
    genres = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], bool)
    # a burst of Horror (rows 0, 1, 4, newest first): Horror alone (Comedy 1/3, Drama 1/3 drop)
    np.testing.assert_allclose(session_intent(genres, np.array([4, 1, 0])), [1.0, 0.0, 0.0])
    # a spread (Horror 2/4, Comedy 2/4, Drama 2/4): every genre at half is kept
    np.testing.assert_allclose(session_intent(genres, np.array([1, 2, 3, 4])), [0.5, 0.5, 0.5])
    # nothing agreed on, padding and no history: no intent
    np.testing.assert_allclose(session_intent(genres, np.array([0, 2, 3])), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(session_intent(genres, np.array([0, -1, -1])), [1.0, 0.0, 0.0])
    assert session_intent(genres, np.zeros(0, np.int64)).tolist() == [0.0, 0.0, 0.0]
