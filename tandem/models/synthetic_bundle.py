"""A synthetic model bundle at any scale (tests: thousands of items; benchmark: 1M x 5M).

Everything has the real shapes and code paths: item vectors in power-law-sized clusters
(L2-normalised, as the two-tower export), ALS factors whose norms grow with popularity, FAISS
indexes from ``tandem.models.ann``, a numpy user tower in the ``two_tower/user_tower.npz`` format,
and a LightGBM lambdarank ranker trained by ``tandem.models.ranker.train_ranker`` on rows with the
REAL ``tandem.features.ranking_features`` layout. Raw feature rows (items for the fast path, users
and sessions for the online store) are functions of the id, so 5M users need no stored table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tandem import schema as s
from tandem.features import entity as F
from tandem.features import query_history as QH
from tandem.features import ranking_features as RF
from tandem.features.tower_features import ItemContentSpec, UserFeatureSpec
from tandem.models import als as A
from tandem.models import bundle as B
from tandem.models import ranker as R
from tandem.models.ann import build_index, tune_index

NOW_MS = 1_767_225_600_000  # 2026-01-01 UTC: the synthetic world's "now"
DAY_MS = 86_400_000
ALS_K = 200  # serving's n_als: the ALS index is tuned at the k it is searched with


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of the synthetic world.

    ``n_als_users`` users (ids ``u0..``) have ALS factors; every id below ``n_users`` has
    online-store rows (derived from the id); ids past ``n_users`` are unknown (cold).
    """

    n_items: int = 2_000
    n_users: int = 5_000
    n_als_users: int = 2_000
    dim: int = 32
    als_dim: int = 32
    n_clusters: int = 40
    fresh_share: float = 0.02  # items created in the last 7 days
    n_trees: int = 150
    num_leaves: int = 15
    n_train_groups: int = 400
    group_size: int = 50
    seed: int = 0


def item_id(rows: np.ndarray) -> np.ndarray:
    return np.char.add("i", np.asarray(rows).astype(str)).astype(object)


def user_id(rows: np.ndarray) -> np.ndarray:
    return np.char.add("u", np.asarray(rows).astype(str)).astype(object)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _seed_of(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def user_rows(uid: str, n_items: int) -> tuple[dict, dict]:
    """(raw user row, raw session row) of a synthetic user, a pure function of the id."""
    rng = np.random.default_rng(_seed_of(uid))
    affinity = rng.dirichlet(np.ones(F.N_GENRES)).astype(np.float32)
    user = {
        "user_age_bucket": F.AGE_BUCKETS[rng.integers(len(F.AGE_BUCKETS))],
        "user_gender": F.GENDERS[rng.integers(len(F.GENDERS))],
        "user_signup_ts": int(NOW_MS - rng.integers(1, 2000) * DAY_MS),
        "user_avg_rating": float(rng.uniform(2.5, 4.5)),
        "user_ratings_total": int(rng.integers(0, 500)),
        "user_genre_affinity": affinity.tolist(),
        "user_events_1h": int(rng.integers(0, 3)), "user_events_24h": int(rng.integers(0, 20)),
        "user_events_7d": int(rng.integers(0, 80)), "user_events_total": int(rng.integers(1, 900)),
        "user_positives_7d": int(rng.integers(0, 30)),
        "user_last_event_ts": int(NOW_MS - rng.integers(1, 90) * 3_600_000),
    }
    n_recent = int(rng.integers(0, 8))
    recent = item_id(rng.integers(0, n_items, n_recent)).tolist()
    session = {
        s.SESSION_RECENT_ITEMS: recent,
        s.SESSION_RECENT_GENRES: list(rng.choice(F.GENRE_VOCAB[1:], 2, replace=False)),
        s.SESSION_LENGTH: n_recent, s.SESSION_START_TS: NOW_MS - 600_000,
        s.SESSION_LAST_TS: NOW_MS - 60_000,
        **{s.SESSION_COUNT_PREFIX + t: int(rng.integers(0, 3)) for t in s.EVENT_TYPES},
    } if n_recent else None
    return user, session


def user_activity(n_users: int, seed: int = 0) -> np.ndarray:
    """Relative request rate [n_users] of users ``u0..``: lognormal(0, 1), the activity
    distribution of ``tandem.data.world`` (a few heavy users make a large share of requests)."""
    return np.random.default_rng(seed + 2).lognormal(0.0, 1.0, n_users)


def profile_rows(n_profiles: int, n_items: int) -> pd.DataFrame:
    """``n_profiles`` raw user rows (:func:`user_rows` of ids ``p0..``) for a bulk online store
    where each user holds one of them (:func:`profile_of`)."""
    return pd.DataFrame([user_rows(f"p{j}", n_items)[0] for j in range(n_profiles)])


def profile_of(rows: np.ndarray, n_profiles: int) -> np.ndarray:
    """The profile (row of :func:`profile_rows`) user row ``rows`` holds: a hash of the row
    (splitmix64), so neighbouring ids get unrelated profiles."""
    z = np.asarray(rows, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) % np.uint64(n_profiles)).astype(np.int64)


def item_feature_frame(n_items: int, popularity: np.ndarray, created_at: np.ndarray,
                       seed: int = 0) -> pd.DataFrame:
    """Raw ``F.ITEM_FIELDS`` rows (plus item_id) in catalog order."""
    rng = np.random.default_rng(seed + 1)
    n_genres = rng.integers(1, 4, n_items)
    genre_idx = rng.integers(1, F.N_GENRES, (n_items, 3))
    vocab = np.array(F.GENRE_VOCAB, dtype=object)
    genres = [list(vocab[g[:k]]) for g, k in zip(genre_idx, n_genres, strict=True)]
    pop = popularity.astype(np.float64)
    imps = np.round(pop * 20).astype(np.int64)
    clicks = rng.binomial(imps, 0.05)
    return pd.DataFrame({
        s.ITEM_ID: item_id(np.arange(n_items)),
        "item_genres": genres,
        "item_release_year": rng.integers(1950, 2026, n_items),
        "item_duration_s": rng.integers(600, 10_800, n_items),
        "item_created_at": created_at,
        "item_pop_1h": np.round(pop / 100).astype(np.int64),
        "item_pop_24h": np.round(pop / 10).astype(np.int64),
        "item_pop_7d": np.round(pop / 2).astype(np.int64),
        "item_pop_total": np.round(pop).astype(np.int64),
        "item_impressions_7d": imps, "item_clicks_7d": clicks,
        "item_ctr": ((clicks + F.CTR_PRIOR_A) / (imps + F.CTR_PRIOR_A + F.CTR_PRIOR_B)
                     ).astype(np.float32),
        "item_avg_rating": rng.uniform(2.0, 4.8, n_items).astype(np.float32),
        "item_ratings_total": np.round(pop / 5).astype(np.int64),
        "item_last_event_ts": NOW_MS - rng.integers(1, 30 * 24, n_items) * 3_600_000,
    })


def _tower(spec: SyntheticSpec, user_spec: UserFeatureSpec, item_spec: ItemContentSpec,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    hidden, d = 128, spec.dim

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    return {"user_w1": w(user_spec.dim + d, hidden), "user_b1": np.zeros(hidden, np.float32),
            "user_w2": w(hidden, d) * 0.3, "user_b2": np.zeros(d, np.float32),
            "content_w1": w(item_spec.dim, hidden), "content_b1": np.zeros(hidden, np.float32),
            "content_w2": w(hidden, d), "content_b2": np.zeros(d, np.float32),
            "item_spec": np.array(item_spec.to_json()), "user_spec": np.array(user_spec.to_json()),
            "config": np.array(json.dumps({"dim": d, "history_len": 20}))}


def _train_ranker(spec: SyntheticSpec, rng: np.random.Generator):
    """Lambdarank on random rows of the real feature layout; label depends on a few columns."""
    n = spec.n_train_groups * spec.group_size
    x = rng.standard_normal((n, len(RF.FEATURE_NAMES))).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    signal = np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 2]) * np.nan_to_num(x[:, 7]) \
        + 0.5 * np.nan_to_num(x[:, -1])
    y = (signal + rng.standard_normal(n) > 1.5).astype(int)
    cfg = {**R.RANKER_CONFIG, "n_estimators": spec.n_trees, "num_leaves": spec.num_leaves,
           "min_child_samples": 20, "n_jobs": 1}
    return R.train_ranker(x, y, np.repeat(np.arange(spec.n_train_groups), spec.group_size), cfg)


def world_vectors(spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The world's catalog columns and vectors (``popularity``, ``created``, ``vectors``,
    ``als_items``, ``als_users``), drawn from ``rng`` first thing in :func:`build` (so a bench
    can rebuild them without the rest of the bundle)."""
    n = spec.n_items
    # power-law popularity
    popularity = (1e5 / (1 + rng.permutation(n)) ** 0.9).astype(np.float32)
    n_fresh = max(1, int(spec.fresh_share * n))
    created = NOW_MS - rng.integers(8, 3000, n) * DAY_MS
    created[rng.choice(n, n_fresh, replace=False)] = NOW_MS - rng.integers(0, 7 * 24, n_fresh) \
        * 3_600_000
    # power-law cluster sizes, mild enough that no cluster holds more than a few % of items
    sizes = 1.0 / (1.0 + rng.permutation(spec.n_clusters)) ** 0.7
    cluster = rng.choice(spec.n_clusters, n, p=sizes / sizes.sum())
    centers = _unit(rng.standard_normal((spec.n_clusters, spec.dim)))
    # within-cluster spread ~0.4 of the (unit) center: IVF reaches 0.95 recall with few probes
    vectors = _unit(centers[cluster] + 0.4 / np.sqrt(spec.dim)
                    * rng.standard_normal((n, spec.dim)))
    als_centers = _unit(rng.standard_normal((spec.n_clusters, spec.als_dim)))
    als_items = ((als_centers[cluster] + 0.4 / np.sqrt(spec.als_dim)
                  * rng.standard_normal((n, spec.als_dim)))
                 * (popularity[:, None] / popularity.max()) ** 0.25).astype(np.float32)
    taste = rng.choice(spec.n_clusters, spec.n_als_users, p=sizes / sizes.sum())
    als_users = (als_centers[taste] + 0.4 / np.sqrt(spec.als_dim)
                 * rng.standard_normal((spec.n_als_users, spec.als_dim))).astype(np.float32)
    return {"popularity": popularity, "created": created, "vectors": vectors,
            "als_items": als_items, "als_users": als_users}


def als_queries(spec: SyntheticSpec, als_items: np.ndarray, als_users: np.ndarray,
                n: int = 400, seed: int = 0) -> np.ndarray:
    """``n`` ALS queries as serving makes them in this world (``tandem.models.als.session_query``):
    users drawn uniformly from all ``n_users`` (those past ``n_als_users`` have no nightly
    vector: a bench with 1M of 5M users folds 80 % of its queries from the session alone),
    their own sessions (:func:`user_rows`); users with neither send none."""
    rng = np.random.default_rng(seed)
    yty, out = A.gram(als_items), []
    while len(out) < n:
        row = int(rng.integers(spec.n_users))
        session = user_rows(f"u{row}", spec.n_items)[1]
        recent = session[s.SESSION_RECENT_ITEMS] if session else []
        history = QH.request_history(np.array([int(i[1:]) for i in recent], np.int64))
        query = A.session_query(als_items, yty, als_users[row] if row < spec.n_als_users
                                else None, history, session)
        if query is not None:
            out.append(query)
    return np.asarray(out, np.float32)


def build(out_dir: Path, spec: SyntheticSpec = SyntheticSpec()) -> tuple[Path, Path]:
    """Write ``out_dir/bundle`` (a complete bundle) and ``out_dir/item_features.parquet``.

    Returns
    -------
    (bundle dir, item feature parquet)
    """
    out_dir = Path(out_dir)
    root = out_dir / "bundle"
    rng = np.random.default_rng(spec.seed)
    n = spec.n_items
    world = world_vectors(spec, rng)
    popularity, created, vectors = world["popularity"], world["created"], world["vectors"]
    als_items, als_users = world["als_items"], world["als_users"]

    (root / "als").mkdir(parents=True, exist_ok=True)
    (root / "two_tower").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({s.ITEM_ID: item_id(np.arange(n)), "popularity": popularity,
                  s.CREATED_AT: created}).to_parquet(root / B.ITEMS, index=False)
    pd.DataFrame({s.USER_ID: user_id(np.arange(spec.n_als_users))}).to_parquet(
        root / B.USERS, index=False)
    np.save(root / B.ALS_ITEM_FACTORS, als_items)
    np.save(root / B.ALS_USER_FACTORS, als_users)
    np.save(root / B.TT_ITEM_VECTORS, vectors)
    user_spec = UserFeatureSpec((("age_bucket", F.AGE_BUCKETS), ("gender", F.GENDERS)))
    item_spec = ItemContentSpec(F.GENRE_VOCAB)
    np.savez(root / B.TT_USER_TOWER, **_tower(spec, user_spec, item_spec, rng))
    build_index(vectors, metric="ip", random_state=spec.seed).save(root / B.INDEX_MAIN)
    tune_index(als_items, als_queries(spec, als_items, als_users, seed=spec.seed), ALS_K,
               metric="mips", random_state=spec.seed).save(root / B.INDEX_ALS)
    R.save(_train_ranker(spec, rng), root / B.RANKER_MODEL)
    (root / B.FEATURE_SPEC).write_text(json.dumps({"names": list(RF.FEATURE_NAMES)}))
    B.BundleManifest(dataset="synthetic", parts=[
        B.ITEMS, B.USERS, B.ALS_ITEM_FACTORS, B.ALS_USER_FACTORS, B.TT_ITEM_VECTORS,
        B.TT_USER_TOWER, B.INDEX_MAIN, B.INDEX_ALS, B.RANKER_MODEL, B.FEATURE_SPEC],
        params=asdict(spec)).save(root)
    features = out_dir / "item_features.parquet"
    item_feature_frame(n, popularity, created, spec.seed).to_parquet(features, index=False)
    return root, features
