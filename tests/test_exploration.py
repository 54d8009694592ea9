"""Exploration policies pick valid slates and report exact (or estimated) propensities."""

import numpy as np
import pytest

from tandem.policy.exploration import epsilon_greedy, thompson, ucb


def test_epsilon_zero_is_pure_exploit():
    s = epsilon_greedy(np.array([5.0, 4.0, 3.0]), 10, 3, 0.0, np.random.default_rng(0))
    assert s.picks.tolist() == [0, 1, 2]
    assert not s.explored.any()
    assert s.propensity.tolist() == [1.0, 1.0, 1.0]


def test_epsilon_one_explores_uniformly_without_replacement():
    s = epsilon_greedy(np.array([5.0, 4.0]), 4, 3, 1.0, np.random.default_rng(0))
    assert s.explored.all()
    assert len(set(s.picks.tolist())) == 3
    assert s.propensity == pytest.approx([1 / 4, 1 / 3, 1 / 2])


def test_mixed_propensities_and_dry_pool():
    rng = np.random.default_rng(1)
    s = epsilon_greedy(np.arange(5.0)[::-1], 2, 6, 0.5, rng)
    n_x = int(s.explored.sum())
    assert n_x <= 2 and len(s.picks) == 6
    # exploit picks are the best first, in order
    assert s.picks[~s.explored].tolist() == list(range(6 - n_x))
    # once both explore items are used, exploit slots are forced (propensity 1)
    left = 2 - (np.cumsum(s.explored) - s.explored)
    assert np.all(s.propensity[~s.explored & (left == 0)] == 1.0)
    assert np.all(s.propensity[~s.explored & (left > 0)] == 0.5)
    assert np.all((s.propensity > 0) & (s.propensity <= 1))


def test_empirical_frequency_matches_propensity():
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(4000):
        s = epsilon_greedy(np.array([1.0, 0.5]), 5, 1, 0.2, rng)
        hits += bool(s.explored[0] and s.picks[0] == 3)
    assert hits / 4000 == pytest.approx(0.2 / 5, abs=0.01)


def test_thompson_prefers_certain_winner():
    rng = np.random.default_rng(0)
    s = thompson(np.array([900, 1, 0]), np.array([1000, 1000, 1000]), 1, rng)
    assert s.picks.tolist() == [0]
    assert s.propensity[0] == pytest.approx(1.0, abs=0.01)


def test_thompson_propensity_bounds():
    rng = np.random.default_rng(0)
    s = thompson(np.zeros(20), np.zeros(20), 5, rng, n_draws=200)
    assert len(set(s.picks.tolist())) == 5
    assert np.all(s.propensity >= 1 / 201) and np.all(s.propensity <= 1)
    assert s.propensity.mean() == pytest.approx(5 / 20, abs=0.15)  # uniform posteriors


def test_thompson_propensity_is_the_frequency_it_shows_the_item():
    """The Monte-Carlo propensity estimates P(item in the slate): over many slates the share
    of slates showing each item matches the propensity reported with it."""
    clicks, imps = np.array([30, 12, 5, 1, 0]), np.array([100, 60, 40, 10, 0])
    rng = np.random.default_rng(3)
    shown, reported = np.zeros(5), [[] for _ in range(5)]
    n = 3000
    for _ in range(n):
        s = thompson(clicks, imps, 2, rng, n_draws=256)
        shown[s.picks] += 1
        for item, p in zip(s.picks, s.propensity, strict=True):
            reported[item].append(p)
    for item in range(5):
        assert np.mean(reported[item]) == pytest.approx(shown[item] / n, abs=0.04), item


def test_ucb_index_by_hand_and_unexplored_first():
    # N = 6 impressions, ln 6 = 1.791759
    # item 0: 1/2 + sqrt(2 ln6 / 2) = 0.5 + 1.338566 = 1.838566
    # item 1: 3/4 + sqrt(2 ln6 / 4) = 0.75 + 0.946509 = 1.696509
    # item 2: never shown -> infinite index, reported as 1 + sqrt(2 ln6) = 2.893018
    s = ucb(np.array([1, 3, 0]), np.array([2, 4, 0]), 3, np.random.default_rng(0))
    assert s.picks.tolist() == [2, 0, 1]
    assert s.score == pytest.approx([2.893018, 1.838566, 1.696509], abs=1e-6)
    assert s.propensity.tolist() == [1.0, 1.0, 1.0]  # unique indices: deterministic
    assert s.explored.all()


def test_ucb_bonus_weight_zero_is_greedy_on_ctr():
    s = ucb(np.array([1, 3, 5]), np.array([10, 10, 10]), 2, np.random.default_rng(0), c=0.0)
    assert s.picks.tolist() == [2, 1]
    assert s.score == pytest.approx([0.5, 0.3])


def test_ucb_ties_are_random_and_propensity_is_slot_frequency():
    # three unexplored items tie (1/3 each per slot); item 3 has a finite index and is never shown
    clicks, imps = np.array([0, 0, 0, 5]), np.array([0, 0, 0, 10])
    rng = np.random.default_rng(3)
    first = np.zeros(4)
    for _ in range(3000):
        s = ucb(clicks, imps, 2, rng)
        assert s.propensity == pytest.approx([1 / 3, 1 / 3])
        assert 3 not in s.picks.tolist() and len(set(s.picks.tolist())) == 2
        first[s.picks[0]] += 1
    assert first[:3] / 3000 == pytest.approx([1 / 3] * 3, abs=0.03)
