"""One bundle version loaded for serving: :class:`Engine` answers requests.

Request path of :meth:`Engine.recommend` (stages are timed and named in metrics)::

    online_store  user + session rows from the online store, under a deadline
    user_tower    profile + recent items -> user vector (numpy)
    ann           FAISS top-N over item vectors (user and session queries in one call)
                  + the sequence model's next items over its own index (serving.sequence_source)
                  + FAISS top-N over ALS item factors, the user's vector refolded with the
                  session's recent items (serving.session_retrieval): one search, after the
                  store read (searching the nightly vector while the read was in flight cost a
                  second search for every user with recent items, most of them)
    merge         + fresh + popular + genre content (history + session); union, dedupe, drop
                  seen/excluded  (tandem.policy.retrieval)
    features      one matrix for all candidates (tandem.features.ranking_features, as in training)
    ranker        one LightGBM (or lleaves-compiled) call
    mmr           MMR over the top of the ranked list, calibrated to the genres the session's
                  newest items agree on (tandem.policy.diversify)

Any failing or slow part degrades the answer instead of failing it: no user features -> the
retrieval sources that do not need them; no ranker -> retrieval order; and each such case is
named in ``fallbacks`` and counted. The store read sits behind a circuit breaker
(``serving.breaker``): after a few failed or late reads requests skip it at once
(``online_store_open``) until a trial read succeeds. Client deadlines shrink the stage deadlines
(``ServingConfig.within``). Unknown users with no history take the cold path:
popularity + onboarding-genre content, with epsilon-greedy / Thompson exploration over fresh
items and a propensity for every shown item.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from serving import item_deltas, precomputed
from serving import shared_memory as shm
from serving.breaker import CircuitBreaker
from serving.bundle_load import (
    fitted_als_config,
    load_catalog,
    load_cooc,
    load_user_index,
    with_new_items,
)
from serving.caches import COLD_CACHE_ENTRIES, SIMILAR_CACHE_ENTRIES, BoundedCache
from serving.cold_path import ColdPath
from serving.config import DAY_MS, ServingConfig
from serving.id_index import ARRAYS as ID_ARRAYS
from serving.id_index import IdIndex
from serving.item_table import ItemFeatures, ItemTableFactory
from serving.ranker_model import Ranker
from serving.result import Result, StageClock, explain, new_request_id
from serving.sequence_source import SequenceSource
from serving.session_retrieval import SessionRetrieval
from serving.stores import OnlineStore, UserRows
from serving.validation import RecommendQuery
from serving.warm_up import WarmUpCheck
from tandem import schema as s
from tandem.features import entity as F
from tandem.features import feature_log
from tandem.features import query_history as QH
from tandem.features import ranking_features as RF
from tandem.models import bundle as B
from tandem.models.ann import AnnIndex
from tandem.policy.diversify import rerank
from tandem.policy.retrieval import SOURCE_BITS, SOURCES, CandidatePool, merge

log = logging.getLogger(__name__)

# online-store reads run here so a slow store can be abandoned at its deadline (shared by all
# engines: a hot reload must not leak threads)
_STORE_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="online-store")
# fallbacks that mean the online store did not answer (the user is then unknown only for now)
STORE_FALLBACKS = ("online_store_timeout", "online_store_error", "online_store_open")
_PROFILE_CACHE = 4096  # encoded tower profiles memoised per engine


# ------------------------------------------------------------------------------------ engine

class Engine(ColdPath, WarmUpCheck):
    """Everything one bundle version needs to answer requests; read-only after ``load``.

    Attributes
    ----------
    version : registry version (or ``local``) reported as ``model_version``
    item_ids : unicode array [n_items] in catalog order; ``item_index`` (``IdIndex``) maps id
        -> row, ``user_index`` user id -> row of ``als_users``; all three mapped
    popularity, created_at : [n_items] from ``items.parquet``
    item_vectors : float32 [n_items, d] two-tower vectors; ``main_index`` searches them
    als_items : float32 [n_items, f]; ``als_users`` [n_users, f];
        ``als_index`` searches item factors (inner product, possibly via the L2 transform)
    tower : numpy user tower; ranker : :class:`Ranker`; space : ranking_features.ItemSpace
    feature_columns : the ranker's columns of the ranking_features matrix (None = all), from
        the bundle's ``features.json``, so a bundle trained on fewer features still ranks
    sequence : :class:`SequenceSource`, None in a bundle without the sequence model
    item_features : :class:`ItemFeatures` aligned to the catalog

    The two-tower parts are optional (the nightly DAG's ``skip_two_tower``): without them
    ``tower`` and ``main_index`` are None, ``item_vectors`` are the unit ALS item factors (MMR),
    similar-items searches the ALS index, and retrieval is ALS + fresh + popular.

    The cold path and similar items are :class:`serving.cold_path.ColdPath`'s methods, the
    warm-up :class:`serving.warm_up.WarmUpCheck`'s; what is loaded besides the models comes from
    :mod:`serving.bundle_load`.
    """

    def __init__(self, bundle_dir: Path, version: str, item_features: ItemTableFactory | None,
                 cfg: ServingConfig, cache_dir: Path | None = None):
        from tandem.models.user_tower import UserTower

        root = Path(bundle_dir)
        self.bundle_dir, self.version = root, str(version)
        self.manifest = B.BundleManifest.load(root)
        derived = Path(cache_dir) / "derived" if cache_dir else None
        # catalog ids, their lookup, popularity and creation times: written once per bundle
        # (and hourly delta, whose new items get rows after the bundle's) and mapped
        catalog, self.item_delta = load_catalog(root, cfg.deltas_dir, derived)
        self.item_ids = catalog["ids"]
        self.item_index = IdIndex(*(catalog[name] for name in ID_ARRAYS))
        self.n_items = len(self.item_ids)
        self.popularity = catalog["popularity"]
        self.created_at = catalog["created_at"]
        self.user_index = load_user_index(root, derived)
        # the big arrays mapped from the bundle: N server processes share one copy; hourly new
        # items (serving.item_deltas) extend them into derived files, mapped as well
        new_items = self.item_delta is not None and len(self.item_delta.item_ids) > 0
        als, n = root / B.ALS_ITEM_FACTORS, self.n_items
        self.als_items = (shm.derived_array(als, f"rows-{n}", lambda a: item_deltas.pad_rows(
            a, n), derived) if new_items else shm.load_array(als))
        self.als_users = shm.load_array(root / B.ALS_USER_FACTORS)
        self.als_index = shm.load_index(root / B.INDEX_ALS)
        als_unit = shm.derived_array(als, f"unit-{n}" if new_items else "unit", lambda a: (
            item_deltas.pad_rows(RF.unit_rows(a), n)), derived)
        if (root / B.TT_ITEM_VECTORS).exists():
            self.main_index, self.item_vectors = (
                with_new_items(root, self.item_delta, cfg.deltas_dir, n, derived) if new_items
                else (shm.load_index(root / B.INDEX_MAIN),
                      shm.load_array(root / B.TT_ITEM_VECTORS)))
            self.tower = UserTower.load(root / B.TT_USER_TOWER, self.item_vectors)
        else:  # an ALS-only bundle
            self.item_vectors = als_unit
            self.main_index, self.tower = None, None
        self.sequence = SequenceSource.load(root)
        self.ranker = Ranker(root / B.RANKER_MODEL, cfg.ranker_backend, cache_dir)
        names = (json.loads((root / B.FEATURE_SPEC).read_text())["names"]
                 if (root / B.FEATURE_SPEC).exists() else RF.FEATURE_NAMES)
        self.feature_columns = RF.columns_of(names)
        self.feature_names = tuple(names)  # the columns of the matrix the ranker is given
        if self.ranker.n_features != len(names):
            raise ValueError(f"ranker expects {self.ranker.n_features} features, "
                             f"features.json names {len(names)}")
        self.space = RF.ItemSpace(als_unit, *load_cooc(root, self.n_items, derived))
        self.item_features = (item_features(self.item_ids) if item_features is not None
                              else ItemFeatures.from_frame(pd.DataFrame(
                                  {s.ITEM_ID: self.item_ids, "item_created_at": self.created_at}),
                                  pd.Index(self.item_ids.astype(object))))
        # precomputed source lists (catalog rows, best first)
        self.popular = np.argsort(-self.popularity, kind="stable")[: max(cfg.n_popular,
                                                                        cfg.n_cold_exploit)]
        self.newest = np.argsort(-self.created_at, kind="stable")[: max(cfg.n_fresh,
                                                                       cfg.n_cold_explore)]
        genres = self.item_features.static[:, F.ITEM_GENRE_SLICE] > 0  # [n_items, N_GENRES]
        by_pop = np.argsort(-self.popularity, kind="stable")
        self.genre_top = {g: by_pop[genres[by_pop, j]][: cfg.n_cold_exploit]
                          for j, g in enumerate(F.GENRE_VOCAB)}
        self.session_retrieval = SessionRetrieval.build(self.als_items, genres, self.popularity,
                                                        fitted_als_config(root))
        self._profiles: dict[tuple, np.ndarray] = {}  # see _encode_profile
        # per engine: a swapped-in model starts with empty caches (serving.caches)
        self.cold_cache = BoundedCache("cold_start", COLD_CACHE_ENTRIES)
        self.similar_cache = BoundedCache("similar_items", SIMILAR_CACHE_ENTRIES)

    # --------------------------------------------------------------------------- helpers
    def rows_of(self, item_ids) -> np.ndarray:
        """Catalog rows of ``item_ids`` (unknown ids dropped), order kept (one binary search
        per id in the mapped ``IdIndex``: no per-call setup that grows with the catalog)."""
        rows = self.item_index.get_indexer(list(item_ids))
        return rows[rows >= 0].astype(np.int64)

    def _start_fetch(self, store: OnlineStore, user_id: str,
                     breaker: CircuitBreaker | None) -> tuple[Future, float] | None:
        """The store read, started on ``_STORE_POOL`` (and when), so work can overlap it;
        None when the breaker is open (no read)."""
        if breaker is not None and not breaker.allow():
            return None
        return _STORE_POOL.submit(store.fetch, user_id), time.perf_counter()

    def _finish_fetch(self, pending: tuple[Future, float] | None, cfg: ServingConfig,
                      fallbacks: list[str], breaker: CircuitBreaker | None) -> UserRows:
        """The read's rows, or empty rows once ``online_store_timeout_ms`` has passed since
        it started (or it failed, or the breaker refused it); the outcome goes to ``breaker``."""
        if pending is None:
            fallbacks.append("online_store_open")
            return UserRows()
        future, started = pending
        left = cfg.online_store_timeout_ms / 1000.0 - (time.perf_counter() - started)
        rows = None
        try:
            rows = future.result(timeout=max(left, 0.0))
        except FutureTimeout:
            future.cancel()
            fallbacks.append("online_store_timeout")
        except Exception:  # noqa: BLE001 - any store failure degrades, never fails the request
            log.exception("online store failed")
            fallbacks.append("online_store_error")
        if breaker is not None:
            breaker.record(rows is not None)
        return rows if rows is not None else UserRows()

    def _tower_feats(self, user_raw: Mapping[str, Any]) -> np.ndarray | None:
        """Tower profile input from raw online fields (``age_bucket`` <- ``user_age_bucket``)."""
        spec = self.tower.user_spec
        if spec is None or self.tower.user_feat_dim == 0:
            return None
        values = tuple(user_raw.get(name, user_raw.get(f"user_{name}")) for name, _ in spec.fields)
        return self._encode_profile(values)

    def _encode_profile(self, values: tuple) -> np.ndarray:
        """``user_spec.encode`` of one profile: a pure function of a few categorical values,
        memoised in this engine (a cache keyed on the engine, like ``lru_cache`` on a method,
        would keep every swapped-out engine alive)."""
        out = self._profiles.get(values)
        if out is None:
            spec = self.tower.user_spec
            out = spec.encode({name: [v] for (name, _), v in zip(spec.fields, values,
                                                                 strict=True)})[0]
            out.setflags(write=False)  # shared by every request with this profile
            if len(self._profiles) < _PROFILE_CACHE:  # few profiles; a bound all the same
                self._profiles[values] = out
        return out

    def _search(self, index: AnnIndex, queries: np.ndarray, k: int) -> np.ndarray:
        """Catalog rows [n_queries, k] (-1 padded) nearest by inner product."""
        return index.search(queries, k)[1]

    def _item_matrix(self, rows: np.ndarray, now_ms: int) -> np.ndarray:
        """Ranker item features of catalog ``rows`` at ``now_ms`` (in-memory fast path)."""
        return self.item_features.take(rows, now_ms)

    # --------------------------------------------------------------------------- recommend
    def recommend(self, q: RecommendQuery, cfg: ServingConfig, store: OnlineStore,
                  breaker: CircuitBreaker | None = None) -> Result:
        clock = StageClock()
        fallbacks: list[str] = []
        now_ms = q.ts or int(time.time() * 1000)
        user_row = int(self.user_index.get_indexer([q.user_id])[0])
        with clock.stage("online_store"):
            pending = self._start_fetch(store, q.user_id, breaker)
        with clock.stage("online_store"):
            rows = self._finish_fetch(pending, cfg, fallbacks, breaker)
        session = rows.session or {}
        recent_ids = list(q.session_item_ids) + list(session.get(s.SESSION_RECENT_ITEMS) or [])
        seen = self.rows_of(recent_ids)
        # what every model is queried with: the definition training uses
        # (tandem.features.query_history)
        history = QH.request_history(seen)
        exclude = np.concatenate([seen, self.rows_of(q.exclude_item_ids)])
        result = self._stored(q, cfg, rows, exclude, now_ms, clock)
        if result is not None:  # a precomputed feed, still valid
            pass
        elif rows.user is None and user_row < 0 and len(history) == 0:
            if any(f in STORE_FALLBACKS for f in fallbacks):
                result = self._degraded(q, exclude, clock)  # unknown because the store failed
            else:
                result = self._cold(q, cfg, exclude, now_ms, clock)
        else:
            result = self._warm(q, cfg, rows, history, exclude, user_row, now_ms, clock,
                                fallbacks)
        result.fallbacks = fallbacks + result.fallbacks
        result.stages_ms = clock.stages
        return result

    def _warm(self, q: RecommendQuery, cfg: ServingConfig, rows: UserRows, history: np.ndarray,
              exclude: np.ndarray, user_row: int, now_ms: int, clock: StageClock,
              fallbacks: list[str]) -> Result:
        """Retrieve, rank and diversify."""
        lists: list[tuple[str, np.ndarray, np.ndarray]] = []
        user_raw = dict(rows.user or {})
        with clock.stage("user_tower"):
            try:
                user_vec = (None if self.tower is None
                            else self.tower.encode(self._tower_feats(user_raw), history))
            except Exception:  # noqa: BLE001
                log.exception("user tower failed")
                fallbacks.append("user_tower_error")
                user_vec = None
        with clock.stage("ann"):
            try:
                lists += self._two_tower_lists(user_vec, history, cfg)
            except Exception:  # noqa: BLE001
                log.exception("two-tower retrieval failed")
                fallbacks.append("two_tower_error")
            lists += self._als_guarded(user_row, history, cfg, fallbacks, rows.session)
            if self.sequence is not None:
                try:
                    lists += self.sequence.lists(history, cfg.n_sequence)
                except Exception:  # noqa: BLE001
                    log.exception("sequence retrieval failed")
                    fallbacks.append("sequence_error")
        with clock.stage("merge"):
            fresh = self.newest[self.created_at[self.newest] >= now_ms - cfg.fresh_days * DAY_MS]
            fresh = fresh[: cfg.n_fresh]
            popular = self.popular[: cfg.n_popular]
            lists.append(("fresh", fresh, self.created_at[fresh].astype(np.float32)))
            lists.append(("popularity", popular, self.popularity[popular]))
            try:
                lists.append(("content", *self.session_retrieval.content(user_raw, history,
                                                                         cfg.n_content)))
            except Exception:  # noqa: BLE001 - a bad profile row costs the source, not the reply
                log.exception("content retrieval failed")
                fallbacks.append("content_error")
            pool = merge(lists, exclude, self.n_items)
        scores = logged = None
        request_id = new_request_id()
        if clock.elapsed_ms() > cfg.rank_deadline_ms:
            fallbacks.append("rank_deadline")
        elif len(pool):
            try:
                with clock.stage("features"):
                    x = self._features(pool, lists, user_raw, rows.session, history, q, now_ms)
                with clock.stage("ranker"):
                    scores = self.ranker.predict(x)
            except Exception:  # noqa: BLE001
                log.exception("ranking failed")
                fallbacks.append("ranker_error")
        if scores is None:
            scores = _retrieval_order(pool)
        elif not any(f in STORE_FALLBACKS for f in fallbacks):
            # what the ranker saw, for a sampled share of the candidates (skew checks); not when
            # the user's rows were not read: their defaults measure the store (counted in
            # tandem_fallbacks_total), not a feature's definition
            logged = feature_log.sample(request_id, self.item_ids, pool.rows, x,
                                        self.feature_names, cfg.feature_log_share, now_ms,
                                        q.device or None)
        with clock.stage("mmr"):
            order = rerank(scores, pool.rows, self.item_vectors,
                           self.item_features.static[:, F.ITEM_GENRE_SLICE], q.k,
                           {"mmr_lambda": cfg.mmr_lambda, "mmr_pool": cfg.mmr_pool,
                            "mmr_similarity": cfg.mmr_similarity, "genre_cap": cfg.genre_cap,
                            "calibration": cfg.calibration, "intent_floor": cfg.intent_floor},
                           self.session_retrieval.intent(history)
                           if cfg.calibration > 0 or cfg.intent_floor > 0 else None)
        picked = pool.take(order)
        # no randomisation on this path: each item is shown with probability 1 (exactly)
        return Result(request_id, self.version, self.item_ids[picked.rows].tolist(),
                      scores[order], picked.source_mask, np.ones(len(order)),
                      [explain(int(mk)) for mk in picked.source_mask],
                      candidates=pool.count_by_source(), pool_size=len(pool), logged=logged)

    def _two_tower_lists(self, user_vec: np.ndarray | None, history: np.ndarray,
                         cfg: ServingConfig) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """User-vector and session-centroid neighbours, in ONE index call."""
        queries, names = [], []
        if self.main_index is None:
            return []
        if user_vec is not None:
            queries.append(user_vec)
            names.append(("two_tower", cfg.n_two_tower))
        if len(history):
            queries.append(self.item_vectors[history[:5]].mean(axis=0))
            names.append(("session", cfg.n_session))
        if not queries:
            return []
        found = self._search(self.main_index, np.vstack(queries), max(n for _, n in names))
        out = []
        for (name, n), qv, hits in zip(names, queries, found, strict=True):
            hits = hits[:n]
            hits = hits[hits >= 0]
            out.append((name, hits, self.item_vectors[hits] @ qv))
        return out

    def _als_list(self, user_row: int, history: np.ndarray, cfg: ServingConfig,
                  session: Mapping[str, Any] | None = None
                  ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """ALS neighbours of the user's factors refolded with the session's recent items
        (``serving.session_retrieval``); folded from the session alone for a user who was not
        in the build."""
        query = self.session_retrieval.als_query(
            self.als_users[user_row] if user_row >= 0 else None, history, session)
        if query is None:
            return []
        hits = self._search(self.als_index, query[None], cfg.n_als)[0]
        hits = hits[hits >= 0]
        return [("als", hits, self.als_items[hits] @ query)]

    def _als_guarded(self, user_row: int, history: np.ndarray, cfg: ServingConfig,
                     fallbacks: list[str], session: Mapping[str, Any] | None = None
                     ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """:meth:`_als_list`, degrading to no ALS candidates on any error."""
        try:
            return self._als_list(user_row, history, cfg, session)
        except Exception:  # noqa: BLE001
            log.exception("ALS retrieval failed")
            fallbacks.append("als_error")
            return []

    def _features(self, pool: CandidatePool, lists, user_raw: Mapping[str, Any],
                  session_raw: Mapping[str, Any] | None, history: np.ndarray,
                  q: RecommendQuery, now_ms: int) -> np.ndarray:
        """The ranker matrix through ``tandem.features.ranking_features`` (the training code
        path)."""
        n = len(pool)
        sources = {}
        for name, hits, scores in lists:
            if name not in RF.SOURCES:
                continue
            pos = np.searchsorted(pool.rows, hits)
            ok = (pos < n) & (pool.rows[np.minimum(pos, n - 1)] == hits)
            score = np.full(n, np.nan, dtype=np.float32)
            rank = np.full(n, np.nan, dtype=np.float32)
            score[pos[ok]] = np.asarray(scores, dtype=np.float32)[ok]
            rank[pos[ok]] = np.flatnonzero(ok) + 1.0
            sources[f"{name}_score"], sources[f"{name}_rank"] = score, rank
        user_m = F.user_matrix(_one(user_raw), now_ms)
        session_m = F.session_matrix(_one(session_raw or {}), now_ms)
        recent = np.full((1, RF.N_RECENT), RF.PAD, dtype=np.int64)
        recent[0, : min(len(history), RF.N_RECENT)] = history[: RF.N_RECENT]
        hour = np.array([(now_ms // 3_600_000) % 24], dtype=np.float32)
        device = _device_code(q.device)
        x = RF.build_features(np.zeros(n, dtype=np.int64), pool.rows, sources, user_m,
                              self._item_matrix(pool.rows, now_ms), session_m, hour,
                              device, recent, self.space, self._sequence_inputs(history))
        return x if self.feature_columns is None else x[:, self.feature_columns]

    def _stored(self, q: RecommendQuery, cfg: ServingConfig, rows: UserRows,
                exclude: np.ndarray, now_ms: int, clock: StageClock) -> Result | None:
        """The user's precomputed feed if still valid (``serving.precomputed.usable``) with the
        live filters applied (seen and excluded items); None: compute the answer."""
        feed = rows.feed
        if not precomputed.usable(feed, self.version, cfg, q, rows.session, now_ms):
            return None
        with clock.stage("precomputed"):
            idx = self.item_index.get_indexer(feed.item_ids)
            keep = np.flatnonzero((idx >= 0) & ~np.isin(idx, exclude))[: q.k]
            masks = np.asarray(feed.source_masks, dtype=np.int64)[keep]
        if len(keep) < q.k:  # the filters left too few: compute
            return None
        return Result(new_request_id(), self.version, self.item_ids[idx[keep]].tolist(),
                      np.asarray(feed.scores, dtype=np.float64)[keep], masks,
                      np.ones(len(keep)), [explain(int(mk)) for mk in masks],
                      path="precomputed")

    def _sequence_inputs(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``sequence_affinity``'s inputs: the query the sequence source searched with (the
        session's recent items), None without the model; a zero query without history."""
        if self.sequence is None:
            return None
        enc = self.sequence.encoder
        query = (enc.encode(history[: enc.max_len]) if len(history)
                 else np.zeros(enc.dim, np.float32))
        return query[None], enc.item_vectors

    def _degraded(self, q: RecommendQuery, exclude: np.ndarray, clock: StageClock) -> Result:
        """Popularity only (the online store failed and nothing else identifies the user)."""
        with clock.stage("merge"):
            rows = self.popular[~np.isin(self.popular, exclude)][: q.k]
        mask = np.full(len(rows), SOURCE_BITS["popularity"], dtype=np.int64)
        return Result(new_request_id(), self.version, self.item_ids[rows].tolist(),
                      self.popularity[rows].astype(np.float64), mask, np.ones(len(rows)),
                      [explain(SOURCE_BITS["popularity"])] * len(rows))


@functools.lru_cache(maxsize=1024)
def _device_code(device: str) -> np.ndarray:
    """``ranking_features.device_codes`` of one device string ([1] float32), memoised."""
    out = RF.device_codes(np.array([device], dtype=object))
    out.setflags(write=False)
    return out


def _one(row: Mapping[str, Any]) -> dict[str, list]:
    return {k: [v] for k, v in row.items()} if row else {s.USER_ID: [None]}


def _retrieval_order(pool: CandidatePool) -> np.ndarray:
    """Scores when the ranker is skipped: ALS order, then two-tower, then popularity.

    Returns minus the position in that order, so higher is better like a ranker score.
    """
    cols = [pool.scores[:, SOURCES.index(name)] for name in ("popularity", "two_tower", "als")]
    keys = [np.nan_to_num(-c, nan=np.inf) for c in cols]  # lexsort: last key is primary
    order = np.lexsort(keys)
    scores = np.empty(len(pool))
    scores[order] = -np.arange(len(pool), dtype=np.float64)
    return scores
