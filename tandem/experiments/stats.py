"""The statistics of an A/B readout, over per-variant sufficient statistics (no raw rows).

The unit of randomization is the user (``tandem.policy.ab`` hashes user ids), so every metric is
first summed per user; a variant is then summarised by :class:`Moments` — the count of users and the
sums, squares and cross products of per-user values — which is all the tests below need. That is
what lets the Spark job aggregate on the executors and run the statistics on the driver over a
handful of rows whatever the traffic.

Tests (each returns a :class:`Comparison`: treatment - control, a two-sided CI, a p-value):

* :func:`two_proportion_z` — share of users with an event (conversion): pooled-variance z-test for
  the p-value, unpooled standard error for the interval.
* :func:`delta_ratio` — ratio metrics whose numerator and denominator are both per-user sums
  (CTR = clicks / impressions): the delta method,
  ``Var(Y/X) ~ (Var(Y) - 2 R Cov(X, Y) + R^2 Var(X)) / (n mean(X)^2)``, then a z-test.
* :func:`welch` — means of per-user values (dwell): Welch's unequal-variance t-test.
* :func:`srm` — sample-ratio mismatch: chi-square goodness of fit of the users per variant against
  the configured weights (a low p-value means the split or the logging is broken: distrust all
  other numbers).

Sequential guard: a daily look at a fixed-horizon p-value inflates false positives (five looks at
alpha 0.05 give ~14%). :func:`msprt` is the always-valid mixture SPRT of Johari, Pekelis & Walsh
("Always valid inference", 2017) for an asymptotically normal difference with variance ``V`` and
a normal mixing prior ``N(0, tau^2)``::

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 * diff^2 / (2 V (V + tau^2)))

and the always-valid p-value is ``min(1, 1 / Lambda)``, running-minimised over the looks
(:func:`always_valid_p`). Declaring a winner only when that p-value is below alpha keeps the
false-positive rate at most alpha however often one looks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Moments:
    """Per-variant sums of per-user values ``x`` (e.g. impressions) and ``y`` (e.g. clicks).

    ``n`` users; ``sx = sum x``, ``sy = sum y``, ``sxx = sum x^2``, ``syy = sum y^2``,
    ``sxy = sum x*y``. For a per-user mean metric only ``n, sy, syy`` matter.
    """

    n: int
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0

    @classmethod
    def of(cls, x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Moments:
        """From per-user arrays (tests and the rehearsal; Spark computes the same sums)."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return cls(len(x), float(x.sum()), float(y.sum()), float(x @ x), float(y @ y),
                   float(x @ y))

    @property
    def mean_y(self) -> float:
        return self.sy / self.n if self.n else float("nan")

    @property
    def var_y(self) -> float:
        """Sample variance of the per-user ``y`` (ddof 1)."""
        if self.n < 2:
            return float("nan")
        return max(self.syy - self.sy ** 2 / self.n, 0.0) / (self.n - 1)

    @property
    def ratio(self) -> float:
        """``sum y / sum x`` (e.g. CTR)."""
        return self.sy / self.sx if self.sx else float("nan")

    def ratio_variance(self) -> float:
        """Delta-method variance of :attr:`ratio` across users (ddof 1 moments)."""
        n, r = self.n, self.ratio
        if n < 2 or not self.sx:
            return float("nan")
        mx = self.sx / n
        vx = (self.sxx - self.sx ** 2 / n) / (n - 1)
        vy = (self.syy - self.sy ** 2 / n) / (n - 1)
        cxy = (self.sxy - self.sx * self.sy / n) / (n - 1)
        return max(vy - 2 * r * cxy + r * r * vx, 0.0) / (n * mx * mx)


@dataclass(frozen=True)
class Comparison:
    """Treatment minus control for one metric."""

    control: float
    treatment: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    std_error: float

    @property
    def relative(self) -> float:
        return self.diff / self.control if self.control else float("nan")

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "relative": self.relative}


def _z(alpha: float) -> float:
    return float(stats.norm.ppf(1 - alpha / 2))


def _normal(control: float, treatment: float, se: float, alpha: float,
            se_test: float | None = None) -> Comparison:
    diff = treatment - control
    se_t = se if se_test is None else se_test
    if se_t > 0:
        p = float(2 * stats.norm.sf(abs(diff) / se_t))
    else:
        p = 1.0 if diff == 0 else 0.0
    h = _z(alpha) * se
    return Comparison(control, treatment, diff, diff - h, diff + h, p, se)


def two_proportion_z(x_c: int, n_c: int, x_t: int, n_t: int, alpha: float = 0.05) -> Comparison:
    """Difference of two proportions ``x/n``: pooled z-test p-value, unpooled Wald interval."""
    p_c, p_t = x_c / n_c, x_t / n_t
    pool = (x_c + x_t) / (n_c + n_t)
    se_test = math.sqrt(pool * (1 - pool) * (1 / n_c + 1 / n_t))
    se = math.sqrt(p_c * (1 - p_c) / n_c + p_t * (1 - p_t) / n_t)
    return _normal(p_c, p_t, se, alpha, se_test)


def delta_ratio(control: Moments, treatment: Moments, alpha: float = 0.05) -> Comparison:
    """Difference of ratio metrics ``sum y / sum x`` with user-level delta-method variances."""
    se = math.sqrt(control.ratio_variance() + treatment.ratio_variance())
    return _normal(control.ratio, treatment.ratio, se, alpha)


def welch(control: Moments, treatment: Moments, alpha: float = 0.05) -> Comparison:
    """Difference of per-user means of ``y``: Welch's t-test and its t interval."""
    vc, vt = control.var_y / control.n, treatment.var_y / treatment.n
    se = math.sqrt(vc + vt)
    diff = treatment.mean_y - control.mean_y
    if se == 0:
        return Comparison(control.mean_y, treatment.mean_y, diff, diff, diff,
                          1.0 if diff == 0 else 0.0, 0.0)
    dof = (vc + vt) ** 2 / (vc ** 2 / (control.n - 1) + vt ** 2 / (treatment.n - 1))
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    h = float(stats.t.ppf(1 - alpha / 2, dof)) * se
    return Comparison(control.mean_y, treatment.mean_y, diff, diff - h, diff + h, p, se)


def srm(users: Sequence[int], weights: Sequence[float]) -> tuple[float, float]:
    """(chi-square statistic, p-value) of observed ``users`` per variant against ``weights``."""
    obs = np.asarray(users, np.float64)
    w = np.asarray(weights, np.float64)
    expected = obs.sum() * w / w.sum()
    chi2 = float(((obs - expected) ** 2 / expected).sum())
    return chi2, float(stats.chi2.sf(chi2, len(obs) - 1))


def msprt(diff: float, variance: float, tau: float) -> float:
    """The mixture likelihood ratio ``Lambda`` of "difference 0" for an estimate ``diff`` with
    ``variance``, mixing over true differences ``N(0, tau^2)``."""
    if variance <= 0:
        return math.inf if diff else 1.0
    t2 = tau * tau
    return math.sqrt(variance / (variance + t2)) * math.exp(
        t2 * diff * diff / (2 * variance * (variance + t2)))


def always_valid_p(looks: Sequence[tuple[float, float]], tau: float) -> float:
    """Always-valid p-value after ``looks`` = [(diff, variance), ...] in time order:
    ``min(1, min_k 1 / Lambda_k)``."""
    p = 1.0
    for diff, var in looks:
        lam = msprt(diff, var, tau)
        p = min(p, 1.0 / lam if lam > 0 else 1.0)
    return p
