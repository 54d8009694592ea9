"""Exploration policies pick valid slates and report exact (or estimated) propensities."""

import numpy as np
import pytest

from tandem.exploration import epsilon_greedy, thompson


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
