"""IPS, SNIPS and DR pinned to hand-computed values, and unbiased on a known bandit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandem.experiments import ope

R = np.array([1, 0, 1, 0])
P0 = np.array([0.5, 0.25, 0.5, 0.25])
P1 = np.array([0.25, 0.5, 0.5, 0.25])  # weights w = [0.5, 2, 1, 1]
Z = 1.959963984540054


def test_ips_hand_computed():
    e = ope.ips(R, P1, P0)
    assert e.estimate == pytest.approx(0.375)  # (0.5 + 0 + 1 + 0) / 4
    sd = math.sqrt(0.6875 / 3)  # squared deviations of [0.5, 0, 1, 0] from 0.375, ddof 1
    assert (e.ci_low, e.ci_high) == pytest.approx((0.375 - Z * sd / 2, 0.375 + Z * sd / 2))


def test_snips_hand_computed():
    e = ope.snips(R, P1, P0)
    assert e.estimate == pytest.approx(1.5 / 4.5)
    # sqrt(mean(w^2 (r - V)^2)) / mean(w) = sqrt(1.1111 / 4) / 1.125
    sd = math.sqrt((0.25 * 4 / 9 + 4 / 9 + 4 / 9 + 1 / 9) / 4) / 1.125
    assert e.ci_high - e.estimate == pytest.approx(Z * sd / 2)


def test_dr_hand_computed():
    e = ope.doubly_robust(R, P1, P0, q0=np.full(4, 0.5), q1=np.full(4, 0.4))
    # 0.4 + w (r - 0.5) = [0.65, -0.6, 0.9, -0.1]
    assert e.estimate == pytest.approx(0.2125)
    assert e.n == 4


def test_zero_propensity_refused():
    with pytest.raises(ValueError, match="propensities"):
        ope.ips(R, P1, np.array([0.5, 0.0, 0.5, 0.5]))


def test_estimators_recover_a_known_policy_value():
    """Three arms with known click rates; uniform logging, a skewed target policy."""
    rng = np.random.default_rng(3)
    rates, target = np.array([0.1, 0.3, 0.6]), np.array([0.1, 0.2, 0.7])
    truth = float(rates @ target)  # 0.49
    n = 30_000
    a = rng.integers(0, 3, n)
    r = rng.random(n) < rates[a]
    p0, p1 = np.full(n, 1 / 3), target[a]
    q = np.full(3, 0.3)  # a wrong reward model: DR stays unbiased through the propensities
    for e in (ope.ips(r, p1, p0), ope.snips(r, p1, p0),
              ope.doubly_robust(r, p1, p0, q[a], np.full(n, q @ target))):
        assert e.ci_low < truth < e.ci_high, e
        assert abs(e.estimate - truth) / truth < 0.03, e
