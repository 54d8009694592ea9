"""The answers an :class:`serving.engine.Engine` gives without a user vector: the cold-start feed
(popularity + onboarding-genre content, exploring fresh items with a logged propensity for every
shown item) and similar items (nearest neighbours of one item).

A mixin of ``Engine``: the methods read the engine's loaded bundle (catalog arrays, indexes,
item features, caches); ``Engine.recommend`` routes unknown users without history here.
"""

from __future__ import annotations

import numpy as np

from serving.config import DAY_MS, ServingConfig
from serving.result import Result, StageClock, explain, new_request_id
from serving.validation import RecommendQuery
from tandem.features import entity as F
from tandem.policy.exploration import epsilon_greedy, thompson, ucb
from tandem.policy.retrieval import SOURCE_BITS, CandidatePool, merge


class ColdPath:
    """Engine methods for requests without a user vector (see the module docstring)."""

    def _cold(self, q: RecommendQuery, cfg: ServingConfig, exclude: np.ndarray, now_ms: int,
              clock: StageClock) -> Result:
        """Popularity + onboarding-genre content, exploring fresh items; propensities logged."""
        with clock.stage("cold_start"):
            # ``newest`` is sorted by creation time: the fresh items are a prefix of it, so
            # their count (with the genres) keys the cached pool exactly
            n_fresh = int(np.count_nonzero(
                self.created_at[self.newest] >= now_ms - cfg.fresh_days * DAY_MS))
            key = (tuple(q.onboarding_genres), min(n_fresh, cfg.n_cold_explore),
                   cfg.n_cold_exploit)
            (exploit, fresh), hit = self.cold_cache.get(key, lambda: self._cold_pool(
                q.onboarding_genres, self.newest[: key[1]], cfg))
            if len(exclude):  # the live filter: a subset keeps the cached order
                exploit = exploit.take(np.flatnonzero(~np.isin(exploit.rows, exclude)))
            explore = fresh[~np.isin(fresh, exclude)]
            rng = np.random.default_rng()
            # one array over both pools: exploit rows first, then explore rows
            pool_rows = np.concatenate([exploit.rows, explore])
            masks = np.concatenate([exploit.source_mask,
                                    np.full(len(explore), SOURCE_BITS["fresh"])])
            if cfg.exploration in ("thompson", "ucb"):
                clicks, imps = self._ctr_counts(pool_rows)
                slate = (thompson(clicks, imps, q.k, rng) if cfg.exploration == "thompson"
                         else ucb(clicks, imps, q.k, rng, cfg.ucb_c))
                picks = slate.picks
            else:
                slate = epsilon_greedy(self.popularity[exploit.rows], len(explore), q.k,
                                       cfg.epsilon, rng)
                picks = np.where(slate.explored, len(exploit) + slate.picks, slate.picks)
            rows, mask = pool_rows[picks], masks[picks]
        return Result(new_request_id(), self.version, self.item_ids[rows].tolist(), slate.score,
                      mask.astype(np.int64), slate.propensity,
                      [explain(int(mk), explored=bool(x))
                       for mk, x in zip(mask, slate.explored, strict=True)], cold_start=True,
                      path="cached" if hit else "computed")

    def _cold_pool(self, genres, fresh: np.ndarray,
                   cfg: ServingConfig) -> tuple[CandidatePool, np.ndarray]:
        """The part of a cold answer no one's history changes (cached per genres and fresh
        set): popularity + genre content minus ``fresh``, content matches first, then by
        popularity; and ``fresh`` (the exploration pool)."""
        content = [self.genre_top[g] for g in genres if g in self.genre_top]
        lists = [("content", r, self.popularity[r]) for r in content]
        lists.append(("popularity", self.popular[: cfg.n_cold_exploit],
                      self.popularity[self.popular[: cfg.n_cold_exploit]]))
        exploit = merge(lists, fresh, self.n_items)
        has_content = (exploit.source_mask & SOURCE_BITS["content"]) > 0
        return exploit.take(np.lexsort((-self.popularity[exploit.rows], ~has_content))), fresh

    def _ctr_counts(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clicks, impressions) over 7 days per row, from the item feature matrix (log1p)."""
        cols = F.ITEM_FEATURES
        imps = np.expm1(self.item_features.static[rows, cols.index("item_log_impressions_7d")])
        ctr = self.item_features.static[rows, cols.index("item_ctr")]
        return ctr * imps, imps

    def similar(self, item_id: str, k: int) -> Result | None:
        """``k`` nearest items to ``item_id`` in two-tower space (ALS space in an ALS-only
        bundle); None for an unknown item."""
        clock = StageClock()
        row = int(self.item_index.get_indexer([item_id])[0])
        if row < 0:
            return None
        index, vectors = ((self.main_index, self.item_vectors) if self.main_index is not None
                          else (self.als_index, self.als_items))
        with clock.stage("similar"):
            def search() -> tuple[np.ndarray, np.ndarray]:
                vec = vectors[row]
                hits = self._search(index, vec[None], k + 1)[0]
                hits = hits[(hits >= 0) & (hits != row)][:k]
                return hits, vectors[hits] @ vec

            (hits, scores), _ = self.similar_cache.get((row, k), search)
        mask = np.full(len(hits), SOURCE_BITS["similar"], dtype=np.int64)
        return Result(new_request_id(), self.version, self.item_ids[hits].tolist(),
                      scores.astype(np.float64), mask, np.ones(len(hits)),
                      ["close in the two-tower space"] * len(hits), stages_ms=clock.stages)
