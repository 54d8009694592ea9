"""Off-policy evaluation: a candidate policy's CTR from impressions logged by another policy.

Each logged impression ``i`` carries its reward ``r_i`` (clicked: 0/1), the logging policy's
probability ``p0_i`` of showing that item in that slot (the ``propensity`` serving and the world
log; exploration must log the true probability) and the candidate's probability ``p1_i`` of the
same choice in the same context. With importance weights ``w_i = p1_i / p0_i``:

* IPS   ``V = mean(w r)`` — unbiased when ``p0 > 0`` wherever ``p1 > 0``; high variance.
* SNIPS ``V = sum(w r) / sum(w)`` — self-normalised: slightly biased, far lower variance; its
  interval uses the delta method, ``Var ~ mean(w^2 (r - V)^2) / (mean(w)^2 n)``.
* DR    ``V = mean(q1 + w (r - q0))`` — a reward model ``q`` (``q0_i`` its prediction for the
  logged choice, ``q1_i`` its expectation under the candidate in the same context) corrected by
  the weighted residual: unbiased if either the propensities or the model are right.

Intervals are normal (mean +- z * sd / sqrt(n)) with impressions treated as independent units —
true in the simulator, where each slot's click depends only on its own item and position; with a
real log that clusters by user, aggregate per user first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A policy value with its two-sided interval."""

    estimator: str
    estimate: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, float | str | int]:
        return asdict(self)


def _interval(name: str, value: float, sd: float, n: int, alpha: float) -> Estimate:
    h = float(stats.norm.ppf(1 - alpha / 2)) * sd / np.sqrt(n)
    return Estimate(name, float(value), float(value - h), float(value + h), n)


def _weights(p1: np.ndarray, p0: np.ndarray) -> np.ndarray:
    p0 = np.asarray(p0, np.float64)
    if (p0 <= 0).any():
        raise ValueError("logged propensities must be > 0 (log true probabilities)")
    return np.asarray(p1, np.float64) / p0


def ips(reward: np.ndarray, p1: np.ndarray, p0: np.ndarray, alpha: float = 0.05) -> Estimate:
    """Inverse propensity scoring."""
    v = _weights(p1, p0) * np.asarray(reward, np.float64)
    return _interval("ips", v.mean(), v.std(ddof=1), len(v), alpha)


def snips(reward: np.ndarray, p1: np.ndarray, p0: np.ndarray, alpha: float = 0.05) -> Estimate:
    """Self-normalised IPS with a delta-method interval."""
    w, r = _weights(p1, p0), np.asarray(reward, np.float64)
    value = float((w * r).sum() / w.sum())
    sd = float(np.sqrt(np.mean(w * w * (r - value) ** 2)) / w.mean())
    return _interval("snips", value, sd, len(w), alpha)


def doubly_robust(reward: np.ndarray, p1: np.ndarray, p0: np.ndarray, q0: np.ndarray,
                  q1: np.ndarray, alpha: float = 0.05) -> Estimate:
    """Doubly robust: model expectation ``q1`` plus the weighted residual of the logged choice."""
    w, r = _weights(p1, p0), np.asarray(reward, np.float64)
    v = np.asarray(q1, np.float64) + w * (r - np.asarray(q0, np.float64))
    return _interval("dr", v.mean(), v.std(ddof=1), len(v), alpha)
