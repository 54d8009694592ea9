"""The request path's knobs (``ServingConfig``); an A/B variant may override any of them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from tandem.policy.diversify import DIVERSIFY_CONFIG

DAY_MS = 86_400_000  # ``fresh_days`` are days of this many ms


@dataclass(frozen=True)
class ServingConfig:
    """Knobs of the request path; an A/B variant may override any of them.

    Candidate counts per source, MMR (``mmr_lambda`` in [0, 1], over the top ``mmr_pool`` of the
    ranked list, items alike by ``mmr_similarity``: their "genre" sets or "embedding" vectors;
    at most ``genre_cap`` items sharing a genre, 0 = off; ``calibration``: weight of the
    list's genre mix matching the genres the session's newest items agree on, 0 = off;
    ``intent_floor``: at least this many items of that intent's strongest genre, 0 = off),
    cold-start exploration
    (``exploration`` = ``epsilon_greedy`` | ``thompson`` | ``ucb`` with bonus weight ``ucb_c``),
    and the per-stage deadlines in milliseconds: the online store read is abandoned after
    ``online_store_timeout_ms``; if retrieval ends later than ``rank_deadline_ms`` into the
    request, ranking is skipped and retrieval order is served.
    """

    max_k: int = 100
    n_two_tower: int = 500
    n_als: int = 200
    n_session: int = 100
    n_sequence: int = 200
    n_fresh: int = 50
    n_popular: int = 100
    n_content: int = 100  # genre-profile candidates of a known user (serving.session_retrieval)
    fresh_days: float = 14.0
    mmr_lambda: float = DIVERSIFY_CONFIG["mmr_lambda"]  # one default for serving and eval
    mmr_pool: int = DIVERSIFY_CONFIG["mmr_pool"]
    mmr_similarity: str = DIVERSIFY_CONFIG["mmr_similarity"]  # "genre" | "embedding"
    genre_cap: int = DIVERSIFY_CONFIG["genre_cap"]
    calibration: float = DIVERSIFY_CONFIG["calibration"]
    intent_floor: int = DIVERSIFY_CONFIG["intent_floor"]
    exploration: str = "epsilon_greedy"
    epsilon: float = 0.1
    ucb_c: float = 1.0
    n_cold_exploit: int = 200
    n_cold_explore: int = 200
    online_store_timeout_ms: float = 20.0
    rank_deadline_ms: float = 60.0
    ranker_backend: str = "auto"  # auto (lleaves when installed) | lleaves | lightgbm
    store_breaker_failures: int = 3  # consecutive failed/late store reads that open the breaker
    store_breaker_cooldown_s: float = 5.0  # open this long, then one trial read
    deltas_dir: str | None = None  # <models>/deltas: hourly new items (serving.item_deltas)
    feature_log_share: float = 0.01  # ranked candidates whose feature rows are logged
    # share of requests a shadow variant scores a second time, in its own niced process
    # (serving.shadow): off the live GIL, but on the same cores, so every request would double
    # the host's CPU per request; on the busy 2-core bench box a 1.0 sample dropped 41 %
    shadow_sample: float = 0.1

    def with_overrides(self, overrides: Mapping[str, Any]) -> ServingConfig:
        return replace(self, **dict(overrides)) if overrides else self

    def within(self, budget_ms: float | None) -> ServingConfig:
        """These knobs with the stage deadlines cut to fit a client deadline ``budget_ms`` away.

        The store read gets at most 40% of it and ranking is skipped once half of it has gone,
        leaving the rest for ranking, MMR and the reply; a generous client deadline changes
        nothing (no copy).
        """
        if budget_ms is None or (budget_ms * 0.4 >= self.online_store_timeout_ms
                                 and budget_ms * 0.5 >= self.rank_deadline_ms):
            return self
        return replace(self, online_store_timeout_ms=min(self.online_store_timeout_ms,
                                                         budget_ms * 0.4),
                       rank_deadline_ms=min(self.rank_deadline_ms, budget_ms * 0.5))

