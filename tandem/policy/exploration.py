"""Exploration policies for the cold-start feed, each returning the propensity of every shown item.

Off-policy evaluation (IPS, SNIPS) later divides by the probability with which the logging policy
showed an item, so each policy reports it exactly (epsilon-greedy, UCB) or by Monte Carlo
(Thompson).

* Epsilon-greedy (Sutton & Barto, ch. 2) over two disjoint pools: each slot independently explores
  with probability ``epsilon`` (a uniform draw without replacement from the explore pool, e.g.
  fresh items) or exploits (the next best item of the exploit pool, e.g. popularity + content).
  Propensity of the item in slot ``j``: ``1 - epsilon`` for an exploit pick and
  ``epsilon / explore items left`` for an explore pick (an item's chance in that slot under the
  policy, given the slots before it).
* Thompson sampling (Chapelle & Li, 2011) over one pool with Beta(1 + clicks, 1 + non-clicks)
  posteriors: show the top ``k`` of one posterior draw. Propensity = P(item in the top ``k``),
  estimated from ``n_draws`` extra draws, floored at ``1 / (n_draws + 1)`` so IPS never divides
  by zero.
* UCB1 (Auer, Cesa-Bianchi & Fischer, 2002) over one pool: show the top ``k`` of
  ``clicks / impressions + c * sqrt(2 ln N / impressions)`` (``N`` = impressions of the whole
  pool); an item never shown has an infinite index, so unexplored items go first. UCB1 rather
  than a Beta-posterior upper quantile (Bayes-UCB): the index is closed form and deterministic,
  so the propensity is exact, not a Monte-Carlo estimate. Ties (e.g. every unexplored item) are
  broken by a uniform random permutation, so the item in a slot whose index ties with ``g - 1``
  others is there with probability ``1 / g`` (its tie group is shuffled over the group's
  consecutive slots); an item with a unique index is there with probability 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slate:
    """What a policy chose to show.

    Attributes
    ----------
    picks : int64 array [m]
        Positions into the pool(s) the policy was given, in slot order (see each policy).
    propensity : float64 array [m]
        Probability (0, 1] that the policy shows that item there.
    explored : bool array [m]
        True where the item came from the exploration draw.
    score : float64 array [m]
        Exploit score, or the posterior sample for Thompson sampling.
    """

    picks: np.ndarray
    propensity: np.ndarray
    explored: np.ndarray
    score: np.ndarray


def epsilon_greedy(exploit_scores: np.ndarray, n_explore: int, k: int, epsilon: float,
                   rng: np.random.Generator) -> Slate:
    """Fill ``k`` slots from an exploit pool (best first) and an explore pool.

    Parameters
    ----------
    exploit_scores : float array [n_exploit]
        Scores of the exploit pool, ALREADY sorted best first.
    n_explore : int
        Size of the explore pool (disjoint from the exploit pool).
    k, epsilon, rng
        Slots to fill, exploration rate in [0, 1], random source.

    Returns
    -------
    Slate
        ``picks`` index the exploit pool where ``explored`` is False and the explore pool where
        it is True.
    """
    n_exploit = len(exploit_scores)
    k = min(int(k), n_exploit + int(n_explore))
    explore = rng.random(k) < epsilon
    # a pool that runs dry hands its slots to the other one (then deterministically)
    explore &= np.cumsum(explore) <= n_explore
    explore |= np.cumsum(~explore) > n_exploit
    n_x = int(explore.sum())
    explore_picks = rng.choice(int(n_explore), size=n_x, replace=False)
    exploit_picks = np.arange(k - n_x)
    picks = np.empty(k, dtype=np.int64)
    picks[explore] = explore_picks
    picks[~explore] = exploit_picks
    # pool sizes left before each slot; a slot whose other pool is empty was forced
    explore_left = n_explore - (np.cumsum(explore) - explore)
    exploit_left = n_exploit - (np.cumsum(~explore) - ~explore)
    p_explore = np.where(exploit_left > 0, epsilon, 1.0)
    p_exploit = np.where(explore_left > 0, 1.0 - epsilon, 1.0)
    propensity = np.where(explore, p_explore / np.maximum(explore_left, 1), p_exploit)
    score = np.zeros(k, dtype=np.float64)
    score[~explore] = np.asarray(exploit_scores, dtype=np.float64)[exploit_picks]
    return Slate(picks, np.clip(propensity, 1e-12, 1.0), explore, score)


def _trials(clicks: np.ndarray, impressions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clicks, impressions) as float64, impressions >= 0 and clicks within [0, impressions]."""
    imp = np.maximum(np.asarray(impressions, dtype=np.float64), 0.0)
    return np.clip(np.asarray(clicks, dtype=np.float64), 0.0, imp), imp


def thompson(clicks: np.ndarray, impressions: np.ndarray, k: int, rng: np.random.Generator,
             n_draws: int = 256) -> Slate:
    """Top ``k`` of one Beta posterior draw per item, with Monte-Carlo propensities.

    Parameters
    ----------
    clicks, impressions : arrays [n]
        Observed successes and trials per item (clicks are clipped to impressions).
    k, rng, n_draws
        Slots, random source, draws used to estimate P(item in top k).

    Returns
    -------
    Slate
        ``picks`` index the pool; every pick counts as explored.
    """
    clk, imp = _trials(clicks, impressions)
    a, b = 1.0 + clk, 1.0 + imp - clk
    n = len(imp)
    k = min(int(k), n)
    theta = rng.beta(a, b)
    picks = np.argsort(-theta, kind="stable")[:k]
    draws = rng.beta(a, b, size=(n_draws, n))
    top = np.argpartition(-draws, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n),
                                                                               (n_draws, 1))
    in_top = np.bincount(top.ravel(), minlength=n) / n_draws
    propensity = np.maximum(in_top[picks], 1.0 / (n_draws + 1))
    return Slate(picks.astype(np.int64), propensity, np.ones(k, dtype=bool), theta[picks])


def ucb(clicks: np.ndarray, impressions: np.ndarray, k: int, rng: np.random.Generator,
        c: float = 1.0) -> Slate:
    """Top ``k`` by UCB1 index, ties in random order, exact per-slot propensities.

    ``clicks`` and ``impressions`` are per-item counts as for :func:`thompson`; ``rng`` only
    breaks ties; ``c`` weighs the exploration bonus (1 = UCB1 as published).

    Returns
    -------
    Slate
        ``picks`` index the pool; every pick counts as explored (the whole slate is the bandit's).
        ``score`` is the index; an unexplored item reports ``1 + c * sqrt(2 ln N)`` (mean 1 after
        one impression): finite, and no lower than the index of any item shown at least once.
    """
    clk, imp = _trials(clicks, impressions)
    n = len(imp)
    k = min(int(k), n)
    log_n = np.log(max(imp.sum(), 1.0))
    seen = imp > 0
    index = np.full(n, np.inf)
    index[seen] = clk[seen] / imp[seen] + c * np.sqrt(2.0 * log_n / imp[seen])
    # a random permutation first, then a stable sort: equal indices come out in random order
    shuffled = rng.permutation(n)
    picks = shuffled[np.argsort(-index[shuffled], kind="stable")[:k]]
    _, group, size = np.unique(index, return_inverse=True, return_counts=True)
    propensity = 1.0 / size[group[picks]]
    score = np.where(seen, index, 1.0 + c * np.sqrt(2.0 * log_n))[picks]
    return Slate(picks.astype(np.int64), propensity, np.ones(k, dtype=bool), score)
