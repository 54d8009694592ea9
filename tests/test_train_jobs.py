"""The ALS, ranker and nightly evaluate jobs on a tiny lake written with pandas (Spark reads it)."""

import json
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tandem import schema as S
from tandem.data.dataset import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, conform

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
def test_training_table_is_int_coded_in_catalog_order(spark, paths):
    from jobs import build_training_table
    from tandem.data import lake as L
    from tandem.features import ranking_features as RF
    from tandem.models import bundle as B

    events = _write_lake(paths)
    start, end = datetime(2024, 1, 1), datetime(2024, 1, 20)
    counts = build_training_table.run(spark, paths, start, end, {"cooc_top_k": 3})
    # 24 users x 5 engaged items, plus the impression-only pairs of users who never engaged m0
    shown_only = sum(1 for u in range(24) if "m0" not in set(
        events[(events[S.USER_ID] == f"u{u}") & (events[S.EVENT_TYPE] != S.IMPRESSION)]
        [S.ITEM_ID]))
    assert counts == {"events": len(events), "users": 24, "items": 12,
                      "pairs": 120 + shown_only, "positive_pairs": 120, "unknown_items": 0}
    table = L.TrainingTable.of(paths, "20240120")
    bundle = paths.models / "20240120"
    items = pd.read_parquet(bundle / B.ITEMS)
    users = pd.read_parquet(bundle / B.USERS)
    # same created_at for every item: catalog order is by id; the bundle's files are the
    # dictionaries in index order
    assert list(items[S.ITEM_ID]) == sorted(f"m{i}" for i in range(12))
    assert list(users[S.USER_ID]) == sorted(f"u{u}" for u in range(24))
    items_dict = table.items().to_pandas().sort_values(L.ITEM_IDX)
    assert items_dict[L.ITEM_IDX].tolist() == list(range(12))
    assert items_dict[S.ITEM_ID].tolist() == items[S.ITEM_ID].tolist()
    cols = table.interactions(list(L.INTERACTION_COLUMNS))
    assert cols[L.USER_IDX].dtype == np.int32 and cols[L.ITEM_IDX].dtype == np.int32
    assert cols[L.WEIGHT].dtype == np.float32 and cols[S.TS].dtype == np.int64
    frame = pd.DataFrame(cols).assign(user=lambda f: users[S.USER_ID].to_numpy()[f[L.USER_IDX]],
                                      item=lambda f: items[S.ITEM_ID].to_numpy()[f[L.ITEM_IDX]])
    # confidence of a play with 2 minutes of dwell: 1 + 1 * 120000 / 600000; a click: 1
    for etype, weight in ((S.PLAY, 1.2), (S.CLICK, 1.0)):
        event = events[events[S.EVENT_TYPE] == etype].iloc[0]
        got = frame[(frame["user"] == event[S.USER_ID]) & (frame["item"] == event[S.ITEM_ID])]
        assert got[L.WEIGHT].tolist() == pytest.approx([weight])
        assert got[L.POSITIVE_TS].tolist() == [event[S.TS]] == got[S.TS].tolist()
        assert got[L.ENGAGED_TS].tolist() == [event[S.TS]]
    # impression-only pairs: no weight, not positive, never in a query history
    shown = frame[frame[L.WEIGHT] == 0]
    assert len(shown) == shown_only and shown[L.POSITIVE_TS].isna().all()
    assert shown[L.ENGAGED_TS].isna().all()
    # an engaged pair's first engagement is its first non-impression event
    engaged = events[events[S.EVENT_TYPE] != S.IMPRESSION]
    first = engaged.groupby([S.USER_ID, S.ITEM_ID])[S.TS].min()
    got = frame.dropna(subset=[L.ENGAGED_TS]).set_index(["user", "item"])[L.ENGAGED_TS]
    assert len(got) == len(first) == 120
    assert got.sort_index().astype(np.int64).tolist() == first.sort_index().tolist()
    # co-occurrence: each item's 3 best neighbours of the full matrix, same values
    seen = sp.csr_matrix((np.ones(len(frame)), (cols[L.USER_IDX], cols[L.ITEM_IDX])),
                         shape=(24, 12))
    full = RF.cooccurrence(seen).toarray()
    top = table.cooc().toarray()
    for i in range(12):
        kept = np.flatnonzero(top[i])
        assert len(kept) == min(3, np.count_nonzero(full[i]))
        np.testing.assert_allclose(top[i, kept], full[i, kept], rtol=1e-6)
        assert top[i, kept].min() >= np.sort(full[i])[-3] - 1e-6
    # idempotent: a re-run rewrites the same table
    build_training_table.run(spark, paths, start, end, {"cooc_top_k": 3})
    again = table.interactions(list(L.INTERACTION_COLUMNS))
    order = np.lexsort((cols[L.ITEM_IDX], cols[L.USER_IDX]))
    order_again = np.lexsort((again[L.ITEM_IDX], again[L.USER_IDX]))
    np.testing.assert_array_equal(again[L.WEIGHT][order_again], cols[L.WEIGHT][order])


@pytest.mark.spark
def test_train_als_job_fits_the_table_and_saves_factors(spark, paths, monkeypatch):
    from jobs import build_training_table, train_als
    from tandem.models import bundle as B

    _write_lake(paths)
    start, end = datetime(2024, 1, 1), datetime(2024, 1, 20)
    cfg = {"factors": 4, "iterations": 5}
    with pytest.raises(FileNotFoundError, match="build_training_table"):
        train_als.run(None, paths, start, end, cfg)
    build_training_table.run(spark, paths, start, end)
    counts = train_als.run(None, paths, start, end, cfg)
    # 24 users x 5 engaged items; the impressions add no pair
    assert counts == {"pairs": 120, "users": 24, "items": 12}
    bundle = paths.models / "20240120"
    items = pd.read_parquet(bundle / B.ITEMS)
    users = pd.read_parquet(bundle / B.USERS)
    user_factors = np.load(bundle / B.ALS_USER_FACTORS)
    item_factors = np.load(bundle / B.ALS_ITEM_FACTORS)
    assert user_factors.shape == (24, 4) and item_factors.shape == (12, 4)
    # the two taste groups: a user's factors score their own group's items higher
    group = np.array([int(i[1:]) >= 6 for i in items[S.ITEM_ID]])
    scores = user_factors @ item_factors.T
    even = np.array([int(u[1:]) % 2 == 0 for u in users[S.USER_ID]])
    assert (scores[even][:, ~group].mean() > scores[even][:, group].mean())
    assert (scores[~even][:, group].mean() > scores[~even][:, ~group].mean())
    # idempotent: a re-run of the same interval rewrites the same factors
    train_als.run(None, paths, start, end, cfg)
    np.testing.assert_array_equal(np.load(bundle / B.ALS_ITEM_FACTORS), item_factors)
    # a driver budget too small for the factors: a clear error naming the setting, no OOM
    monkeypatch.setenv("TANDEM_DRIVER_BUDGET_MB", "0.001")
    with pytest.raises(MemoryError, match="TANDEM_DRIVER_BUDGET_MB"):
        train_als.run(None, paths, start, end, cfg)


@pytest.mark.spark
def test_train_ranker_job_trains_on_retrieved_candidates(spark, paths):
    from jobs import build_index, build_training_table, train_als, train_ranker
    from tandem.features import ranking_features as RF
    from tandem.models import bundle as B
    from tandem.models import ranker as R

    _write_lake(paths)
    cfg = {"two_tower": None, "label_days": 3, "feature_source": "history", "als_k": 6,
           "popular_k": 3, "als": {**train_ranker.CONFIG["als"], "factors": 4, "iterations": 5},
           "ranker": {**train_ranker.CONFIG["ranker"], "n_estimators": 5,
                      "min_child_samples": 2}}
    start, end = datetime(2024, 1, 1), datetime(2024, 1, 10)
    with pytest.raises(FileNotFoundError, match="build_training_table"):
        train_ranker.run(None, paths, start, end, cfg)
    # the night's models, fitted once: the ranker retrieves with them, it fits none itself
    build_training_table.run(spark, paths, start, end)
    train_als.run(None, paths, start, end, cfg["als"])
    build_index.run(None, paths, start, end)
    counts = train_ranker.run(None, paths, start, end, cfg)
    # every user engages on days 6 and 8, inside the 3 label days (impressions are no label);
    # the ranker gets its seeded half of them
    assert counts["label_pairs"] == 48 and 0 < counts["request_users"] < 24
    assert counts["groups"] > 0 and counts["positives"] > 0
    # a cap on request users bounds the work whatever the user count
    capped = train_ranker.run(None, paths, start, end, {**cfg, "night": {"max_users": 3}})
    assert capped["request_users"] == 3 and capped["groups"] <= 3
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


def _write_label_tables(paths, n_users=24):
    """lake/labels/ranking and lake/negatives/ranking as the hourly jobs lay them out.

    Every user was shown their taste group's six items on day 7 at an hour and device of their
    own, labelled 0 here (a pair the table holds as engaged after the cut stays positive: the
    one never engaged is the shown-not-engaged row), and one sampled negative of the other
    group per user.
    """
    labels, negatives = [], []
    for u in range(n_users):
        ts = T0 + 7 * DAY_MS + (u % 12) * 3_600_000
        pool = range(0, 6) if u % 2 == 0 else range(6, 12)
        for i in pool:
            labels.append({S.USER_ID: f"u{u}", S.ITEM_ID: f"m{i}", S.TS: ts + i,
                           S.CTX_DEVICE: ("ios", "tv", "web")[u % 3], S.LABEL: 0})
        negatives.append({S.USER_ID: f"u{u}", S.ITEM_ID: "m11" if u % 2 == 0 else "m5",
                          S.TS: ts, "source": "sampled"})
    for frame, path, parts in ((pd.DataFrame(labels), paths.ranking_labels, [S.DATE, S.HOUR]),
                               (pd.DataFrame(negatives), paths.ranking_negatives, [S.DATE])):
        stamps = pd.to_datetime(frame[S.TS], unit="ms", utc=True)
        frame[S.DATE] = stamps.dt.strftime("%Y-%m-%d")
        frame[S.HOUR] = stamps.dt.hour.astype("int32")
        frame.drop(columns=[c for c in (S.HOUR,) if c not in parts]).to_parquet(
            path, partition_cols=parts, index=False)


@pytest.mark.spark
def test_ranker_training_set_reads_the_lake_labels_at_each_requests_time(spark, paths):
    """No dead ends, no constant context: the lake's label-0 rows and sampled negatives are
    kept as explicit negatives, and each request is asked at its own labelled row's hour and
    device (the context features vary as in the events)."""
    from jobs import build_index, build_training_table, train_als, train_ranker
    from tandem.data.catalog import run_bundle_dir
    from tandem.data.lake import epoch_ms
    from tandem.evaluation import night as N
    from tandem.evaluation import requests as EQ
    from tandem.features import ranking_features as RF

    _write_lake(paths)
    cfg = {**train_ranker.CONFIG, "two_tower": None, "label_days": 3,
           "feature_source": "history", "als_k": 6, "popular_k": 3,
           "ranker_negative_rate": 0.0,  # only positives and explicit negatives remain
           "als": {**train_ranker.CONFIG["als"], "factors": 4, "iterations": 5}}
    start, end = datetime(2024, 1, 1), datetime(2024, 1, 10)
    build_training_table.run(spark, paths, start, end)
    train_als.run(None, paths, start, end, cfg["als"])
    build_index.run(None, paths, start, end)
    cut = epoch_ms(N.label_cut(start, end, cfg))
    batch = N.prepare(paths, run_bundle_dir(paths, end), start, end, cut, N.RANKER, cfg,
                      item_events=True)
    at_cut = batch.requests

    def training_set():
        lake = N.lake_labels(paths, batch.catalog.user_ids, batch.catalog.item_ids, batch.req,
                             cut, epoch_ms(end))
        batch.requests = N.requests_at_labels(at_cut, lake)
        return lake, train_ranker.training_set(batch, lake, cfg)

    # before the hourly jobs wrote anything: every request at the cut, no device, no negatives
    lake, (X, y, _) = training_set()
    hour, device = (RF.FEATURE_NAMES.index(c) for c in ("ctx_hour", "ctx_device_code"))
    assert len(lake.first) == 0 and (y == 1).all()
    assert len(np.unique(X[:, hour])) == 1 and (X[:, device] == 0).all()
    _write_label_tables(paths)
    lake, (X, y, groups) = training_set()
    users = batch.catalog.user_ids[batch.req.user_rows]
    assert len(lake.first) == len(users)
    # each request at its labelled row: hours and devices vary like the events'
    expected_hours = {(int(u[1:]) % 12) for u in users}
    assert set(X[:, hour].astype(int)) == expected_hours and len(expected_hours) > 1
    assert set(X[:, device].astype(int)) == {RF.DEVICES.index(d) + 1 for d in
                                              {("ios", "tv", "web")[int(u[1:]) % 3]
                                               for u in users}}
    # explicit negatives: the shown-not-engaged candidates, all kept at a zero sampling rate
    negatives = batch.cands[N.pair_mask(batch.cands, lake.negative)
                            & ~(batch.labels | N.pair_mask(batch.cands, lake.positive))]
    with_positive = negatives["user_row"].isin(batch.cands["user_row"][batch.labels])
    assert (y == 0).sum() == with_positive.sum() > 0
    assert set(np.unique(groups)) <= set(batch.req.user_rows)
    assert isinstance(batch.requests, EQ.Requests)


def _night(spark, paths, n_eval_users=24):
    """The tiny lake's night up to the ranker (history features), and evaluate's config."""
    from jobs import build_index, build_training_table, train_als, train_ranker

    _write_lake(paths)
    start, end = datetime(2024, 1, 1), datetime(2024, 1, 10)
    als = {**train_ranker.CONFIG["als"], "factors": 4, "iterations": 5}
    cfg = {"two_tower": None, "label_days": 3, "als_k": 6, "popular_k": 3, "retrieval_k": 12,
           "content_k": 3, "als": als, "night": {"max_users": n_eval_users}}
    build_training_table.run(spark, paths, start, end)
    train_als.run(None, paths, start, end, als)
    build_index.run(None, paths, start, end)
    train_ranker.run(None, paths, start, end, {
        **cfg, "feature_source": "history",
        "ranker": {**train_ranker.CONFIG["ranker"], "n_estimators": 5, "min_child_samples": 2}})
    return start, end, cfg


@pytest.mark.spark
def test_nightly_evaluate_reads_columns_never_a_pandas_window(spark, paths, monkeypatch):
    """The window's item columns are streamed into numpy in chunks; the features equal those
    computed from the whole window as a pandas frame; and the job runs under a driver budget
    that the window in pandas does not fit, with the same numbers."""
    import dataclasses

    from jobs import evaluate
    from tandem.data import lake as L
    from tandem.data.item_events import ItemEvents
    from tandem.evaluation import night as N
    from tandem.evaluation import protocol as E
    from tandem.evaluation import requests as EQ

    start, end, cfg = _night(spark, paths, n_eval_users=4)
    metrics = evaluate.run(None, paths, start, end, cfg)
    assert 0.0 <= metrics["ndcg@10"] <= 1.0 and "als.ndcg@10" in metrics
    # several chunks of 5 events, each coded against the catalog on its own
    monkeypatch.setattr(L, "ITEM_EVENT_CHUNK", 5)
    bundle = paths.models / "20240110"
    full = {**E.EVAL_CONFIG, **N.CUT_CONFIG, **cfg}
    cut = L.epoch_ms(N.label_cut(start, end, full))
    batch, _ = evaluate.night_batch(paths, bundle, start, end, cut, full)
    asked = set(batch.catalog.user_ids[batch.req.user_rows])
    assert len(asked) == 4 and set(batch.fitted.history[S.USER_ID]) == asked
    window = L.read_window(paths, start, end, user_ids=list(batch.catalog.user_ids))
    before = window.events[window.events[S.TS] < cut].reset_index(drop=True)
    # item features count every user's pre-cut events (3 engagements + 1 impression each)
    assert len(batch.fitted.item_events) == len(before) == 24 * 4
    whole = dataclasses.replace(batch.fitted, history=before,
                                item_events=ItemEvents.of(before, batch.catalog.item_ids))
    for name in ("item", "ts", "event_type", "rating"):
        np.testing.assert_array_equal(getattr(batch.fitted.item_events, name),
                                      getattr(whole.item_events, name))
    X = EQ.feature_matrix(batch.fitted, batch.catalog, batch.requests, batch.cands, full)
    np.testing.assert_array_equal(
        X, EQ.feature_matrix(whole, batch.catalog, batch.requests, batch.cands, full))
    # a budget half the window's pandas frame: the old whole-window read stops, evaluate runs
    n_window = len(window.events)
    monkeypatch.setenv("TANDEM_DRIVER_BUDGET_MB", str(n_window * L.EVENT_ROW_BYTES / 2 / 2**20))
    with pytest.raises(MemoryError, match="TANDEM_DRIVER_BUDGET_MB"):
        L.read_window(paths, start, end, user_ids=list(batch.catalog.user_ids))
    assert evaluate.run(None, paths, start, end, cfg) == metrics


@pytest.mark.spark
def test_nightly_evaluate_asks_each_request_at_its_labelled_row(spark, paths):
    """As the ranker trains and serving is asked: each evaluated user at their first labelled
    row after the cut, with its hour and device; retrieval-only numbers do not move."""
    from jobs import evaluate
    from tandem.data import lake as L
    from tandem.evaluation import night as N
    from tandem.evaluation import protocol as E
    from tandem.evaluation import requests as EQ
    from tandem.features import ranking_features as RF
    from tandem.models import bundle as B

    start, end, cfg = _night(spark, paths)
    bundle = paths.models / "20240110"
    at_cut = evaluate.run(None, paths, start, end, cfg)
    assert B.BundleManifest.load(bundle).params["eval_requests_at_label_time"] == 0
    _write_label_tables(paths)
    full = {**E.EVAL_CONFIG, **N.CUT_CONFIG, **cfg}
    cut = L.epoch_ms(N.label_cut(start, end, full))
    batch, lake = evaluate.night_batch(paths, bundle, start, end, cut, full)
    users = batch.catalog.user_ids[batch.req.user_rows]
    assert len(lake.first) == len(users) > 1
    X = EQ.feature_matrix(batch.fitted, batch.catalog, batch.requests, batch.cands, full)
    number = np.array([int(u[1:]) for u in batch.catalog.user_ids[batch.cands["user_row"]]])
    hour, device = (RF.FEATURE_NAMES.index(c) for c in ("ctx_hour", "ctx_device_code"))
    np.testing.assert_array_equal(X[:, hour], number % 12)
    np.testing.assert_array_equal(
        X[:, device], [RF.DEVICES.index(("ios", "tv", "web")[n % 3]) + 1 for n in number])
    assert len(np.unique(X[:, hour])) > 1
    # the job asks the same way, and only the two-stage (ranked) numbers can move
    at_labels = evaluate.run(None, paths, start, end, cfg)
    params = B.BundleManifest.load(bundle).params
    assert params["eval_requests_at_label_time"] == params["eval_users"] == len(users)
    report = json.loads((bundle / evaluate.REPORT).read_text())
    assert report["protocol"]["request_hours"] == len({int(u[1:]) % 12 for u in users})
    unmoved = [k for k in at_cut if k.startswith(("als.", "popularity.", "retrieval."))]
    assert unmoved and {k: at_labels[k] for k in unmoved} == {k: at_cut[k] for k in unmoved}


@pytest.mark.spark
def test_dense_index_is_the_global_sorted_rank_across_partitions(spark):
    """Unique keys over many sort partitions get 0..n-1 in key order, with no gap or repeat."""
    from jobs.build_training_table import _dense_index

    keys = [f"k{i:05d}" for i in np.random.default_rng(1).permutation(5000)]
    df = spark.createDataFrame([(k, i % 3) for i, k in enumerate(keys)], "key string, g int")
    before = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "7")
    spark.conf.set("spark.sql.adaptive.enabled", "false")  # keep all 7 ranges apart
    try:
        ranked = _dense_index(df.repartition(5), ["g", "key"], "idx").toPandas()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)
        spark.conf.set("spark.sql.adaptive.enabled", "true")
    ranked = ranked.sort_values("idx")
    assert ranked["idx"].tolist() == list(range(5000))
    expected = sorted(zip((i % 3 for i in range(5000)), keys, strict=True))
    assert list(zip(ranked["g"], ranked["key"], strict=True)) == expected
    assert str(ranked["idx"].dtype) == "int32"
