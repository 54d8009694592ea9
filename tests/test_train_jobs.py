"""The ALS and ranker jobs on a tiny lake written with pandas (Spark reads it)."""

import json
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tandem import schema as S
from tandem.dataset import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, conform

DAY_MS = 86_400_000
T0 = int(pd.Timestamp("2024-01-01", tz="UTC").value // 1_000_000)


def _write_lake(paths, n_users=24, n_items=12):
    """Two taste groups; every user clicks/plays 5 items of their group over 10 days."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        pool = np.arange(0, 6) if u % 2 == 0 else np.arange(6, 12)
        for k, i in enumerate(rng.choice(pool, size=5, replace=False)):
            ts = T0 + (2 * k) * DAY_MS + u * 60_000
            etype = S.CLICK if k % 2 == 0 else S.PLAY
            rows.append({S.EVENT_ID: f"e{u}-{i}", S.EVENT_TYPE: etype, S.USER_ID: f"u{u}",
                         S.ITEM_ID: f"m{i}", S.TS: ts,
                         S.DWELL_MS: 120_000 if etype == S.PLAY else None})
        # an impression only: must carry no ALS confidence
        rows.append({S.EVENT_ID: f"imp{u}", S.EVENT_TYPE: S.IMPRESSION, S.USER_ID: f"u{u}",
                     S.ITEM_ID: "m0", S.TS: T0 + 1})
    events = conform(pd.DataFrame(rows), EVENT_COLUMNS)
    stamps = pd.to_datetime(events[S.TS], unit="ms", utc=True)
    events[S.DATE] = stamps.dt.strftime("%Y-%m-%d")
    events[S.HOUR] = stamps.dt.hour.astype("int32")
    events.to_parquet(paths.events, partition_cols=[S.DATE, S.HOUR], index=False)
    items = conform(pd.DataFrame({S.ITEM_ID: [f"m{i}" for i in range(n_items)],
                                  S.TITLE: [f"M{i}" for i in range(n_items)],
                                  S.GENRES: [["Action"] if i < 6 else ["Drama"]
                                             for i in range(n_items)],
                                  S.CREATED_AT: T0}), ITEM_COLUMNS)
    paths.items.mkdir(parents=True)
    items.to_parquet(paths.items / "items.parquet", index=False)
    users = conform(pd.DataFrame({S.USER_ID: [f"u{u}" for u in range(n_users)],
                                  S.SIGNUP_TS: T0}), USER_COLUMNS)
    paths.users.mkdir(parents=True)
    users.to_parquet(paths.users / "users.parquet", index=False)
    return events


@pytest.mark.spark
def test_train_als_job_builds_confidence_and_saves_factors(spark, paths):
    from jobs import train_als
    from tandem import bundle as B
    from tandem.als import ALS_CONFIG

    events = _write_lake(paths)
    start, end = datetime(2024, 1, 1), datetime(2024, 1, 20)
    cfg = {"factors": 4, "iterations": 5}
    counts = train_als.run(spark, paths, start, end, cfg)
    # 24 users x 5 engaged items; the impressions add no pair
    assert counts == {"pairs": 120, "users": 24, "items": 12, "unknown_items": 0}
    # the run's bundle (run id = end date): factor rows follow the catalog it wrote first
    bundle = paths.models / "20240120"
    items = pd.read_parquet(bundle / B.ITEMS)
    users = pd.read_parquet(bundle / B.USERS)
    user_factors = np.load(bundle / B.ALS_USER_FACTORS)
    item_factors = np.load(bundle / B.ALS_ITEM_FACTORS)
    assert user_factors.shape == (24, 4) and item_factors.shape == (12, 4)
    # same created_at for every item: catalog order is by id
    assert list(items[S.ITEM_ID]) == sorted(f"m{i}" for i in range(12))
    assert list(users[S.USER_ID]) == sorted(f"u{u}" for u in range(24))
    # the two taste groups: a user's factors score their own group's items higher
    group = np.array([int(i[1:]) >= 6 for i in items[S.ITEM_ID]])
    scores = user_factors @ item_factors.T
    even = np.array([int(u[1:]) % 2 == 0 for u in users[S.USER_ID]])
    assert (scores[even][:, ~group].mean() > scores[even][:, group].mean())
    assert (scores[~even][:, group].mean() > scores[~even][:, ~group].mean())
    # confidence of a play with 2 minutes of dwell: 1 + 1 * 120000 / 600000
    pairs = train_als.transform(train_als.extract(spark, paths, start, end),
                                ALS_CONFIG).toPandas()
    play = events[events[S.EVENT_TYPE] == S.PLAY].iloc[0]
    got = pairs[(pairs[S.USER_ID] == play[S.USER_ID]) & (pairs[S.ITEM_ID] == play[S.ITEM_ID])]
    assert got["confidence"].tolist() == pytest.approx([1.2])
    # idempotent: a re-run of the same interval rewrites the same factors
    train_als.run(spark, paths, start, end, cfg)
    np.testing.assert_array_equal(np.load(bundle / B.ALS_ITEM_FACTORS), item_factors)
    # run_id picks the bundle folder (the DAG passes --run-id; a new folder, a new catalog)
    train_als.run(spark, paths, start, end, cfg, run_id="other")
    np.testing.assert_array_equal(np.load(paths.models / "other" / B.ALS_ITEM_FACTORS),
                                  item_factors)


@pytest.mark.spark
def test_train_ranker_job_trains_on_retrieved_candidates(spark, paths):
    from jobs import train_ranker
    from tandem import bundle as B
    from tandem import ranker as R
    from tandem import ranking_features as RF

    _write_lake(paths)
    cfg = {"two_tower": None, "label_days": 3, "feature_source": "history", "als_k": 6,
           "popular_k": 3, "als": {**train_ranker.CONFIG["als"], "factors": 4, "iterations": 5},
           "ranker": {**train_ranker.CONFIG["ranker"], "n_estimators": 5,
                      "min_child_samples": 2}}
    counts = train_ranker.run(spark, paths, datetime(2024, 1, 1), datetime(2024, 1, 10), cfg)
    assert counts["groups"] > 0 and counts["positives"] > 0
    assert counts["feature_source"] == "history"
    bundle = paths.models / "20240110"
    booster = R.load(bundle / B.RANKER_MODEL)
    assert booster.num_feature() == len(RF.FEATURE_NAMES)
    cooc = sp.load_npz(bundle / B.RANKER_COOC)
    assert cooc.shape == (12, 12) and cooc.diagonal().sum() == 0.0
    # rows/columns in the bundle's catalog order: the two taste groups never co-occur except
    # through m0, the item every user was shown (impressions count, as in training)
    items = list(pd.read_parquet(bundle / B.ITEMS)[S.ITEM_ID])
    rows = [items.index(f"m{i}") for i in (1, 2)]
    cols = [items.index(f"m{i}") for i in (7, 8)]
    assert cooc[np.ix_(rows, cols)].sum() == 0.0
    spec = json.loads((bundle / B.FEATURE_SPEC).read_text())
    assert spec["names"] == list(RF.FEATURE_NAMES)
