"""Maximal marginal relevance (Carbonell & Goldstein, 1998) over the top of a ranked list.

Step ``t`` picks ``argmax_i  lambda * rel_i - (1 - lambda) * max_{j in S} cos(v_i, v_j)`` among
the items not yet picked (``S`` = picked so far). ``lambda = 1`` keeps the ranker's order;
``lambda = 0`` only spreads items out. Relevance is min-max scaled to [0, 1] first so that it
and cosine similarity share a range. Each step is one vectorised update over the pool: the
loop runs ``k`` times, never once per candidate.

Category diversification rides on the same loop: with ``max_per_genre = c > 0`` an item may be
picked only while EVERY one of its genres has fewer than ``c`` picks so far (Ziegler et al.'s
topic diversification, as a hard quota). "Every genre", not a "primary" one: catalog genres
(MovieLens) are an unordered multi-hot set, so no genre of an item is primary, and a quota on
any genre it carries is the one that keeps a list from being, say, eight comedies. An item
without genres is never blocked. When the quota leaves no eligible item before ``k`` picks, the
rest are filled by plain MMR over what is left: the caller asked for ``k`` items, and a short
list is worse than a soft cap.

Calibration (Steck, "Calibrated Recommendations", RecSys 2018) rides on it too: with a target
genre distribution ``p`` and ``calibration = w > 0``, step ``t`` also subtracts
``w * KL(p || q~)``, where ``q`` is the genre distribution of the list with the candidate added
and ``q~ = (1 - a) q + a p`` (``a`` = :data:`CALIBRATION_ALPHA`, so an absent genre costs a
finite amount). The target serving and ``make eval`` pass is the session's intent
(:func:`tandem.policy.retrieval.session_intent`): the genres at least half of the user's newest
engaged items share. The ranker learns which items a user engages with next from histories; it
cannot learn what a session says when the training events hold no sessions like it (a burst of
one genre), and it ranks the popular head above them. Twelve Horror films just engaged with make
Horror the whole target, and the list brings Horror films up until the marginal KL gain no
longer pays for the relevance lost. The cost, measured on ml-100k: most histories' newest items
agree on a genre (Drama, mostly), and a target of that genre alone, normalised to a
distribution, asks for a list of nothing else -- validation NDCG@10 fell 16 % at ``w = 1``, so
calibration is off by default (:data:`DIVERSIFY_CONFIG`). Calibrating to the whole genre profile
(history and session) cost as much (17 %): it chased every minor genre of every user.

The intent floor is the one-sided form that is on by default: with ``intent_floor = m > 0`` the
list holds at least ``m`` items of the intent's strongest genre (when the pool has them), and it
only ever acts on the LAST slots -- once the slots left are exactly the ones the floor still needs,
only items of that genre may be picked. A list that already shows ``m`` of them is untouched, so a
history whose newest items agree on Drama (most of ml-100k) loses nothing; a burst of twelve
Horror films after a Drama history gets at least ``m`` Horror films the ranker alone would have
ranked below the fold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The request path's re-ranking defaults: serving's ``ServingConfig`` and ``make eval``'s
# two-stage read them from here, so what is evaluated is what is served.
DIVERSIFY_CONFIG: dict[str, Any] = {
    "mmr_lambda": 0.7,  # relevance weight of :func:`mmr`
    "mmr_pool": 100,  # MMR runs over this many of the ranker's best
    # what MMR's "similar" means (:data:`SIMILARITIES`): "embedding", the cosine of the served
    # item vectors (two-tower), or "genre", the cosine of the items' genre sets -- the spread
    # ``make eval``'s diversity@10 measures. The embedding stays: on ml-100k's validation split
    # (ranker of three inner splits) the genre penalty lifted diversity above ALS's without a
    # cap but pulled coverage@10 below it (the same few off-genre films for every user): only
    # lambda 0.8 met both, at NDCG@10 0.200, against 0.203 for the embedding at lambda 0.6 and
    # a genre cap of 4; ``make eval``'s sweep chooses between them on that split
    "mmr_similarity": "embedding",
    "genre_cap": 0,  # at most this many picks per genre (0 = off)
    # weight of the genre-calibration term of :func:`mmr` (0 = off). Off: on ml-100k's
    # validation split every weight tried cost NDCG@10 (session intent, lambda 0.7, no cap:
    # 0.205 -> 0.173 at 1, 0.149 at 3), so ``make eval``'s sweep chooses 0; an A/B variant
    # (``ServingConfig.calibration``, ``serving.server --calibration``) turns it on
    "calibration": 0.0,
    # at least this many of a list's picks carry the session intent's strongest genre (0 = off):
    # the one-sided calibration, acting only on a list that lacks them (see the module docstring)
    "intent_floor": 3,
}
SIMILARITIES = ("embedding", "genre")
CALIBRATION_ALPHA = 0.01  # the target's share mixed into the list's distribution (Steck's alpha)


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, lam: float = 0.7,
        genres: np.ndarray | None = None, max_per_genre: int = 0,
        target: np.ndarray | None = None, calibration: float = 0.0,
        intent_floor: int = 0) -> np.ndarray:
    """Positions (into ``relevance``) of ``min(k, n)`` items in MMR order.

    Parameters
    ----------
    relevance : float array [n]
        Ranker scores of the pool (any scale; higher is better).
    vectors : float array [n, d]
        Item embeddings of the pool (normalised here; zero rows get similarity 0).
    k : int
        How many to pick.
    lam : float in [0, 1]
        Relevance weight (the issue's default is 0.7).
    genres : bool array [n, n_genres], optional
        Genre multi-hot of the pool; needed when ``max_per_genre > 0``.
    max_per_genre : int
        Quota per genre in the picked list (0 = no quota).
    target : float array [n_genres], optional
        The target genre distribution, e.g. the session's intent (any non-negative scale;
        normalised here); needed, with
        ``genres``, when ``calibration > 0``. None or all-zero: no calibration.
    calibration : float
        Weight of ``KL(target || list's genre distribution)`` in each step's gain (0 = off).
    intent_floor : int
        At least this many picks carry ``target``'s strongest genre, as far as the pool has
        them and never above ``max_per_genre`` (0 = off; needs ``genres`` and a non-zero
        ``target``).

    Returns
    -------
    int64 array [min(k, n)]
    """
    n = len(relevance)
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.zeros(n)
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    sim = v @ v.T  # [n, n] cosine
    base = lam * rel  # the gain before anything is picked (no penalty yet)
    gain = base.copy()
    capped = max_per_genre > 0 and genres is not None
    calibrate = _calibration(genres, target, calibration)
    if capped or calibrate is not None:
        onehot = np.asarray(genres, dtype=bool)
        per_genre = np.zeros(onehot.shape[1], dtype=np.int64)
        blocked = np.zeros(n, dtype=bool)
    intent_rows = _intent_rows(genres, target, intent_floor)
    # a floor above the genre cap would break the cap: the cap wins
    floor = min(intent_floor, max_per_genre) if capped else intent_floor
    still_needed = 0 if intent_rows is None else min(floor, k, int(intent_rows.sum()))
    picked = np.empty(k, dtype=np.int64)
    for t in range(k):
        total = gain if calibrate is None else gain - calibrate(per_genre, onehot)
        if still_needed and still_needed >= k - t:  # every slot left is the floor's
            total = np.where(intent_rows, total, -np.inf)
        best = int(np.argmax(total))
        if capped:
            allowed = np.where(blocked, -np.inf, total)
            # an all-blocked (or all-picked) pool falls back to plain MMR
            best = int(np.argmax(allowed)) if np.isfinite(allowed.max()) else best
        if capped or calibrate is not None:
            per_genre += onehot[best]
        if capped:
            blocked |= onehot[:, per_genre >= max_per_genre].any(axis=1)
        picked[t] = best
        if still_needed and intent_rows[best]:
            still_needed -= 1
        # the penalty is the max similarity to any picked item, so each pick can only lower
        # a gain: take the min with this pick's term instead of recomputing from scratch
        after = base - (1.0 - lam) * sim[best]
        gain = after if t == 0 else np.minimum(gain, after)
        gain[best] = -np.inf  # earlier picks stay -inf through the min
    return picked


def _calibration(genres: np.ndarray | None, target: np.ndarray | None, weight: float):
    """``cost(per_genre, onehot) -> [n]``: ``weight * KL(p || q~)`` of the list so far
    (``per_genre`` counts) with each candidate added; None when calibration is off."""
    if weight <= 0 or genres is None or target is None:
        return None
    p = np.clip(np.nan_to_num(np.asarray(target, dtype=np.float64)), 0.0, None)
    if p.sum() <= 0:
        return None
    p = p / p.sum()
    on = p > 0
    p_on = p[on]

    def cost(per_genre: np.ndarray, onehot: np.ndarray) -> np.ndarray:
        counts = per_genre[None, :] + onehot  # [n, n_genres], the list with each candidate
        q = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        q = (1.0 - CALIBRATION_ALPHA) * q[:, on] + CALIBRATION_ALPHA * p_on
        return weight * (p_on * np.log(p_on / q)).sum(axis=1)

    return cost


def _intent_rows(genres: np.ndarray | None, target: np.ndarray | None,
                 floor: int) -> np.ndarray | None:
    """bool [n]: the pool's items carrying ``target``'s strongest genre; None when the floor is
    off or there is no intent."""
    if floor <= 0 or genres is None or target is None:
        return None
    p = np.nan_to_num(np.asarray(target, dtype=np.float64))
    if p.max(initial=0.0) <= 0:
        return None
    return np.asarray(genres, dtype=bool)[:, int(np.argmax(p))]


def rerank(relevance: np.ndarray, rows: np.ndarray, vectors: np.ndarray,
           genres: np.ndarray | None, k: int, cfg: dict[str, Any] = DIVERSIFY_CONFIG,
           target: np.ndarray | None = None) -> np.ndarray:
    """Positions (into ``relevance``) of the ``k`` items one list shows: :func:`mmr` with the
    genre cap, the calibration to ``target`` (the session's intent) and its floor over the top
    ``mmr_pool`` by relevance, as serving's request path applies it.

    ``rows`` [n] are the candidates' catalog rows; ``vectors`` [n_items, d] and ``genres``
    [n_items, n_genres] (> 0 where the item has the genre; may be None when the cap and the
    calibration are off) are catalog-wide and only the top ``mmr_pool`` rows are gathered.
    MMR's similarity is the cosine of ``vectors`` with ``cfg["mmr_similarity"]`` "embedding"
    (the default), of ``genres`` with "genre" (``vectors`` when ``genres`` is None).
    """
    top = np.argsort(-np.asarray(relevance), kind="stable")[: cfg["mmr_pool"]]
    cap, weight = cfg["genre_cap"], cfg.get("calibration", 0.0)
    floor = cfg.get("intent_floor", 0)
    similarity = cfg.get("mmr_similarity", DIVERSIFY_CONFIG["mmr_similarity"])
    if similarity not in SIMILARITIES:
        raise ValueError(f"mmr_similarity must be one of {SIMILARITIES}, got {similarity!r}")
    picked_rows = rows[top]
    uses_target = (weight > 0 or floor > 0) and target is not None
    uses_genres = (cap > 0 or uses_target) and genres is not None
    onehot = genres[picked_rows] > 0 if uses_genres else None
    space = genres if similarity == "genre" and genres is not None else vectors
    return top[mmr(relevance[top], space[picked_rows], k, cfg["mmr_lambda"], onehot, cap,
                   target, weight, floor)]
