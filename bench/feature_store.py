"""Online feature reads: Feast SDK per request vs Tandem's fast path; writes JSON to reports/.

Synthetic feature rows (``--users`` x ``--items``, one snapshot) go through the real repo:
apply, materialize into the SQLite online store (or Redis with ``--redis host:port``). Then, for
random users and random 500-item candidate sets:

- sdk_user_1: ``get_online_features`` of the ranker's user service for 1 user
- sdk_items_500: ``get_online_features`` of the item service for 500 items
- fast_user_1: :func:`tandem.features.online.fetch_user_features` with a 50 ms deadline (a
  worker thread) + user and session vectors; fast_user_1_no_deadline: the same read in the caller
- fast_items_500: :meth:`ItemFeatureTable.take` of 500 catalog rows (the item matrix)

Usage: ``python bench/feature_store.py [--items 10000] [--users 1000] [--calls 300]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tandem import schema as s
from tandem.config import REPO_ROOT, Paths
from tandem.features import entity as F
from tandem.features import feature_store as fs
from tandem.features import online as FO

NOW = pd.Timestamp("2024-01-03", tz="UTC")


def synthetic_features(paths: Paths, n_users: int, n_items: int, seed: int = 0) -> None:
    """One snapshot of plausible user and item feature rows at NOW."""
    rng = np.random.default_rng(seed)
    now_ms = int(NOW.value // 1_000_000)
    aff = rng.dirichlet(np.ones(F.N_GENRES), n_users).astype(np.float32)
    users = pd.DataFrame({
        s.USER_ID: [f"u{i}" for i in range(n_users)], s.EVENT_TIMESTAMP: NOW,
        "user_age_bucket": rng.choice(F.AGE_BUCKETS, n_users),
        "user_gender": rng.choice(F.GENDERS, n_users),
        "user_signup_ts": now_ms - rng.integers(0, 10**10, n_users),
        "user_avg_rating": rng.uniform(1, 5, n_users).astype(np.float32),
        "user_ratings_total": rng.integers(0, 500, n_users),
        "user_genre_affinity": list(aff),
        **{f"user_events_{w}": rng.integers(0, 50, n_users) for w in ("1h", "24h", "7d", "total")},
        "user_positives_7d": rng.integers(0, 20, n_users),
        "user_last_event_ts": now_ms - rng.integers(0, 10**9, n_users)})
    genres = np.array(F.GENRE_VOCAB, dtype=object)
    items = pd.DataFrame({
        s.ITEM_ID: [f"i{i}" for i in range(n_items)], s.EVENT_TIMESTAMP: NOW,
        "item_genres": [list(rng.choice(genres, rng.integers(1, 4), replace=False))
                        for _ in range(n_items)],
        "item_release_year": rng.integers(1930, 2024, n_items),
        "item_duration_s": rng.integers(0, 10_000, n_items),
        "item_created_at": now_ms - rng.integers(0, 10**11, n_items),
        **{f"item_pop_{w}": rng.integers(0, 1000, n_items) for w in ("1h", "24h", "7d", "total")},
        "item_impressions_7d": rng.integers(0, 5000, n_items),
        "item_clicks_7d": rng.integers(0, 100, n_items),
        "item_ctr": rng.uniform(0, 0.2, n_items).astype(np.float32),
        "item_avg_rating": rng.uniform(1, 5, n_items).astype(np.float32),
        "item_ratings_total": rng.integers(0, 1000, n_items),
        "item_last_event_ts": now_ms - rng.integers(0, 10**9, n_items)})
    for out, frame in ((paths.user_features, users), (paths.item_features, items)):
        folder = out / "date=2024-01-02"
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(folder / "part-0.parquet", index=False)


def _timed(fn, calls: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": float(np.median(times)), "p99_ms": float(np.percentile(times, 99)),
            "calls": calls}


def bench(home: Path, n_users: int, n_items: int, calls: int, redis: str | None) -> dict:
    paths = Paths(home)
    synthetic_features(paths, n_users, n_items)
    t = time.perf_counter()
    store = fs.apply(paths, profile="redis" if redis else "sqlite", redis=redis)
    apply_s = time.perf_counter() - t
    t = time.perf_counter()
    fs.materialize(paths, (NOW - pd.Timedelta(days=1)).to_pydatetime(), NOW.to_pydatetime(),
                   store)
    materialize_s = time.perf_counter() - t
    fs.push_session(store, [{s.USER_ID: f"u{i}", s.EVENT_TIMESTAMP: NOW, s.SESSION_LENGTH: 3,
                             s.SESSION_RECENT_ITEMS: ["i1", "i2"]} for i in range(n_users)])
    item_ids = [f"i{i}" for i in range(n_items)]
    t = time.perf_counter()
    table = FO.ItemFeatureTable(store, item_ids)
    table_load_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    now_ms = int(NOW.value // 1_000_000) + 60_000

    def sdk_user():
        store.get_online_features(features=list(fs.USER_REFS),
                                  entity_rows=[{s.USER_ID: f"u{rng.integers(n_users)}"}]).to_dict()

    def sdk_items():
        ids = rng.choice(n_items, 500, replace=False)
        store.get_online_features(features=list(fs.ITEM_REFS),
                                  entity_rows=[{s.ITEM_ID: item_ids[i]} for i in ids]).to_dict()

    def fast_user():
        values, _ = FO.fetch_user_features(store, f"u{rng.integers(n_users)}", deadline_s=0.05)
        F.user_vector(values, now_ms)
        F.session_vector(values, now_ms)

    def fast_user_sync():
        values, _ = FO.fetch_user_features(store, f"u{rng.integers(n_users)}", deadline_s=None)
        F.user_vector(values, now_ms)
        F.session_vector(values, now_ms)

    def fast_items():
        table.take(rng.choice(n_items, 500, replace=False), now_ms)

    results = {"sdk_user_1": _timed(sdk_user, calls), "sdk_items_500": _timed(sdk_items, calls),
               "fast_user_1": _timed(fast_user, calls),
               "fast_user_1_no_deadline": _timed(fast_user_sync, calls),
               "fast_items_500": _timed(fast_items, calls)}
    return {"online_store": "redis" if redis else "sqlite", "users": n_users, "items": n_items,
            "apply_s": apply_s, "materialize_s": materialize_s, "item_table_load_s": table_load_s,
            "load_avg_1m_after": os.getloadavg()[0], "cpus": os.cpu_count(),
            "python": platform.python_version(), "machine": platform.machine(), **results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--redis", default=None, help="host:port of a running redis-server")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench_feature_store.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = bench(Path(tmp), args.users, args.items, args.calls, args.redis)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
