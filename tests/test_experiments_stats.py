"""Each statistic of the A/B readout pinned to a hand-computed value and to scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from tandem.experiments import stats


def test_two_proportion_z_hand_computed_and_chi2_reference():
    c = stats.two_proportion_z(100, 1000, 130, 1000)
    # pooled p = 230/2000 = 0.115; z = 0.03 / sqrt(0.115 * 0.885 * (2/1000)) = 2.10274
    assert 0.03 / math.sqrt(0.115 * 0.885 * 0.002) == pytest.approx(2.10274, abs=1e-5)
    assert c.p_value == pytest.approx(0.035488, abs=1e-6)
    # unpooled se = sqrt(.1*.9/1000 + .13*.87/1000) = 0.0142513; CI = 0.03 +- 1.96 se
    assert c.std_error == pytest.approx(0.0142513, abs=1e-7)
    assert (c.ci_low, c.ci_high) == pytest.approx((0.002068, 0.057932), abs=1e-6)
    # the pooled z-test is the uncorrected 2x2 chi-square test
    table = [[100, 900], [130, 870]]
    assert c.p_value == pytest.approx(sps.chi2_contingency(table, correction=False)[1], rel=1e-9)
    assert c.relative == pytest.approx(0.3)


def test_delta_ratio_hand_computed_against_the_linearised_residuals():
    x_c, y_c = [10, 20, 5, 8], [1, 3, 0, 2]
    x_t, y_t = [12, 7, 9, 30, 4], [2, 1, 1, 5, 0]
    mc, mt = stats.Moments.of(x_c, y_c), stats.Moments.of(x_t, y_t)
    # control: R = 6/43; residuals e = y - R x; Var(R) = var(e, ddof 1) / (n mean(x)^2)
    #   = 1.467820 / 3 / (4 * 10.75^2) = 0.00105846
    assert mc.ratio_variance() == pytest.approx(0.00105846, rel=1e-5)

    def linearised(x, y):
        x, y = np.asarray(x, float), np.asarray(y, float)
        e = y - y.sum() / x.sum() * x
        return e.var(ddof=1) / (len(x) * x.mean() ** 2)

    se = math.sqrt(linearised(x_c, y_c) + linearised(x_t, y_t))
    c = stats.delta_ratio(mc, mt)
    assert c.std_error == pytest.approx(se, rel=1e-12)
    assert c.diff == pytest.approx(9 / 62 - 6 / 43, rel=1e-12)
    assert c.p_value == pytest.approx(2 * sps.norm.sf(abs(c.diff) / se), rel=1e-12)
    assert c.p_value == pytest.approx(0.87855, abs=1e-5)


def test_welch_matches_scipy_and_hand_values():
    a, b = [1, 2, 3, 4], [2, 4, 6, 8, 10]
    c = stats.welch(stats.Moments.of([0] * 4, a), stats.Moments.of([0] * 5, b))
    # se = sqrt(1.6667/4 + 10/5) = 1.554563
    assert c.std_error == pytest.approx(1.554563, abs=1e-6)
    ref = sps.ttest_ind(b, a, equal_var=False)
    assert c.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert c.diff / c.std_error == pytest.approx(ref.statistic, rel=1e-9)
    assert c.p_value == pytest.approx(0.069134, abs=1e-6)
    assert c.ci_low < 0 < c.ci_high  # p > 0.05 <=> the 95% interval holds 0


def test_srm_chi_square():
    chi2, p = stats.srm([5050, 4950], [1, 1])
    assert chi2 == pytest.approx(1.0)  # 2 * 50^2 / 5000
    assert p == pytest.approx(0.3173105, abs=1e-7)
    chi2, p = stats.srm([100, 260, 640], [0.1, 0.3, 0.6])
    ref = sps.chisquare([100, 260, 640], [100, 300, 600])
    assert (chi2, p) == pytest.approx((ref.statistic, ref.pvalue))
    # chi2 = 40^2/300 + 40^2/600 = 8; with 2 degrees of freedom p = exp(-8/2)
    assert (chi2, p) == pytest.approx((8.0, math.exp(-4.0)))


def test_msprt_hand_computed():
    # V = 1e-4, tau^2 = 4e-4: sqrt(1/5) * exp(4e-4 * 1e-4 / (2 * 1e-4 * 5e-4)) = 0.44721 * e^0.4
    assert stats.msprt(0.01, 1e-4, 0.02) == pytest.approx(math.sqrt(0.2) * math.exp(0.4))
    assert stats.msprt(0.01, 1e-4, 0.02) == pytest.approx(0.667164, abs=1e-6)
    # running minimum of 1 / Lambda over the looks
    lam2 = stats.msprt(0.03, 1e-4, 0.02)
    assert stats.always_valid_p([(0.01, 1e-4), (0.03, 1e-4)], 0.02) == pytest.approx(1 / lam2)
    assert stats.always_valid_p([(0.0, 1e-4)], 0.02) == 1.0


def test_sequential_guard_keeps_daily_looks_at_alpha():
    """A/A with 10 daily looks: stopping at the first naive p < 0.05 fires far more than 5% of
    the time; the always-valid p-value does not."""
    rng = np.random.default_rng(7)
    runs, looks, per_look, alpha = 400, 10, 200, 0.05
    naive = guarded = 0
    for _ in range(runs):
        a = rng.normal(0, 1, looks * per_look)
        b = rng.normal(0, 1, looks * per_look)
        seq, hit = [], False
        for k in range(1, looks + 1):
            n = k * per_look
            ma, mb = stats.Moments.of(np.zeros(n), a[:n]), stats.Moments.of(np.zeros(n), b[:n])
            c = stats.welch(ma, mb)
            hit |= c.p_value < alpha
            seq.append((c.diff, c.std_error ** 2))
        naive += hit
        guarded += stats.always_valid_p(seq, tau=0.1) < alpha
    assert naive / runs > 0.1
    assert guarded / runs <= alpha
