"""The Feast repo end to end on a real registry, DuckDB offline store and SQLite online store.

One applied repo is shared by the module (apply costs seconds). Feature rows are written by hand:
user u1 has snapshots at T0 (mean rating 4.0) and T1 (2.0); items i0..i3 have a T1 snapshot.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tandem import schema as s
from tandem.config import Paths
from tandem.features import entity as F
from tandem.features import feature_store as fs
from tandem.features import online as FO

pytestmark = pytest.mark.feast

T0 = pd.Timestamp("2024-01-02", tz="UTC")
T1 = pd.Timestamp("2024-01-03", tz="UTC")
ITEMS = ["i0", "i1", "i2", "i3"]


def user_row(user_id: str, ts: pd.Timestamp, avg: float) -> dict:
    return {s.USER_ID: user_id, s.EVENT_TIMESTAMP: ts, "user_age_bucket": "25-34",
            "user_gender": "F", "user_signup_ts": 1_600_000_000_000, "user_avg_rating": avg,
            "user_ratings_total": 3, "user_genre_affinity": [0.5, 0.5] + [0.0] * 17,
            "user_events_1h": 1, "user_events_24h": 2, "user_events_7d": 3,
            "user_events_total": 9, "user_positives_7d": 2,
            "user_last_event_ts": int(ts.value // 1_000_000) - 60_000}


def item_row(k: int, ts: pd.Timestamp) -> dict:
    return {s.ITEM_ID: ITEMS[k], s.EVENT_TIMESTAMP: ts, "item_genres": [["Action"], ["Comedy",
            "Drama"], [], ["Nope"]][k], "item_release_year": 1990 + k, "item_duration_s": 60 * k,
            "item_created_at": 1_500_000_000_000 + k, "item_pop_1h": k, "item_pop_24h": 2 * k,
            "item_pop_7d": 3 * k, "item_pop_total": 4 * k, "item_impressions_7d": 10 * k,
            "item_clicks_7d": k, "item_ctr": (k + 1) / (10 * k + 21), "item_avg_rating": 3 + k / 4,
            "item_ratings_total": k, "item_last_event_ts": int(ts.value // 1_000_000) - k}


def snapshot_folder(root: Path, ts: pd.Timestamp) -> Path:
    """The date/hour partition build_features writes a snapshot at ``ts`` to (that of ts - 1 ms),
    created."""
    closes = ts - pd.Timedelta(milliseconds=1)
    folder = root / f"date={closes.date()}" / f"hour={closes.hour}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_features(paths: Paths, t0: pd.Timestamp = T0, t1: pd.Timestamp = T1) -> None:
    """The lake's feature parquet as build_features lays it out (date/hour partitions)."""
    for out, rows in ((paths.user_features, [user_row("u1", t0, 4.0), user_row("u1", t1, 2.0),
                                             user_row("u2", t1, 3.0)]),
                      (paths.item_features, [item_row(k, t1) for k in range(len(ITEMS))])):
        frame = pd.DataFrame(rows)
        for ts, part in frame.groupby(s.EVENT_TIMESTAMP):
            part.to_parquet(snapshot_folder(out, ts) / "part-0.parquet", index=False)


@pytest.fixture(scope="module")
def feast_repo(tmp_path_factory):
    """Applied repo, materialized in two increments: (paths, store, avg rating after the 1st)."""
    paths = Paths(tmp_path_factory.mktemp("feast-sqlite"))
    write_features(paths)
    store = fs.apply(paths)
    fs.materialize(paths, (T0 - timedelta(days=1)).to_pydatetime(), T0.to_pydatetime(), store)
    first = FO.fetch_user_features(store, "u1", deadline_s=5.0)[0]["user_avg_rating"]
    fs.materialize(paths, T0.to_pydatetime(), T1.to_pydatetime(), store)
    return paths, store, first


def test_apply_materialize_online_round_trip(feast_repo):
    paths, store, first = feast_repo
    assert (paths.feast / "registry.db").exists() and (paths.feast / "online.db").exists()
    assert first == 4.0  # the first increment loaded only the T0 row
    values, ok = FO.fetch_user_features(store, "u1", deadline_s=5.0)
    assert ok and values["user_avg_rating"] == 2.0  # the second increment replaced it
    assert values["user_genre_affinity"] == pytest.approx([0.5, 0.5] + [0.0] * 17)
    table = FO.ItemFeatureTable(store, ITEMS)
    cols = pd.DataFrame([item_row(k, T1) for k in range(len(ITEMS))])
    np.testing.assert_array_equal(table.take(np.arange(4), T1), F.item_matrix(cols, T1))
    assert table.take(np.array([1]), T1)[0, F.ITEM_FEATURES.index("item_genre_Drama")] == 1.0


def test_push_to_user_session_is_visible_online(feast_repo):
    paths, store, _ = feast_repo
    fs.push_session(store, [{s.USER_ID: "u2", s.EVENT_TIMESTAMP: T1 + pd.Timedelta(minutes=5),
                             s.SESSION_LENGTH: 3, s.SESSION_RECENT_ITEMS: ["i1", "i0"],
                             s.SESSION_RECENT_GENRES: ["Drama"], "cnt_click": 2}])
    values, ok = FO.fetch_user_features(store, "u2", deadline_s=5.0)
    assert ok and values[s.SESSION_LENGTH] == 3 and values["cnt_click"] == 2
    assert values[s.SESSION_RECENT_ITEMS] == ["i1", "i0"]
    assert values["user_avg_rating"] == 3.0  # batch views are still there


def test_user_row_reader_reads_what_get_online_features_reads(feast_repo):
    _, store, _ = feast_repo
    fs.push_session(store, [{s.USER_ID: "u3", s.EVENT_TIMESTAMP: T1, s.SESSION_LENGTH: 2,
                             s.SESSION_RECENT_ITEMS: ["i3", "i2"],
                             s.SESSION_RECENT_GENRES: ["Comedy"], "cnt_view": 2}])
    reader = FO.UserRowReader(store)
    for user in ("u1", "u2", "u3", "nobody"):  # batch rows only, both, session only, none
        sdk = store.get_online_features(features=list(fs.USER_REFS),
                                        entity_rows=[{s.USER_ID: user}]).to_dict()
        assert reader.read(user) == {k: v[0] for k, v in sdk.items() if k != s.USER_ID}
    u1, u3 = reader.read("u1"), reader.read("u3")
    assert u1["user_avg_rating"] == 2.0 and u1[s.SESSION_LENGTH] is None
    assert u3[s.SESSION_RECENT_ITEMS] == ["i3", "i2"] and u3["user_avg_rating"] is None
    assert set(reader.read("nobody").values()) == {None}


def test_point_in_time_never_joins_a_later_row(feast_repo):
    _, store, _ = feast_repo
    labels = pd.DataFrame({s.USER_ID: ["u1"] * 4, s.ITEM_ID: ["i1"] * 4,
                           s.EVENT_TIMESTAMP: [T0 - pd.Timedelta(seconds=1), T0,
                                               T1 - pd.Timedelta(seconds=1), T1]})
    frame = fs.training_frame(store, labels)
    assert list(frame[s.EVENT_TIMESTAMP]) == list(labels[s.EVENT_TIMESTAMP])  # order kept
    # before T0 no row exists yet; the T1 row (2.0) is never joined to a label before T1
    assert frame["user_avg_rating"].iloc[0] != frame["user_avg_rating"].iloc[0]  # NaN
    assert list(frame["user_avg_rating"].iloc[1:]) == [4.0, 4.0, 2.0]
    # items have only a T1 row: missing before it, defaults in the matrix
    user, item, _ = fs.training_matrices(frame)
    assert user[0, F.USER_FEATURES.index("user_avg_rating")] == F.DEFAULT_RATING
    assert item[2, F.ITEM_FEATURES.index("item_ctr")] == np.float32(F.DEFAULT_CTR)
    assert item[3, F.ITEM_FEATURES.index("item_ctr")] == np.float32(2 / 31)


def test_missing_entity_gives_defaults_not_errors(feast_repo):
    _, store, _ = feast_repo
    values, ok = FO.fetch_user_features(store, "nobody", deadline_s=5.0)
    assert ok and values == F.default_row(F.USER_FIELDS + F.SESSION_FIELDS)
    now = T1 + pd.Timedelta(hours=1)
    np.testing.assert_array_equal(F.user_vector(values, now), F.user_vector({}, now))
    table = FO.ItemFeatureTable(store, ["nope"])
    np.testing.assert_array_equal(table.take(np.array([0]), now)[0],
                                  F.item_matrix({s.ITEM_ID: ["nope"]}, now)[0])
    frame = fs.training_frame(store, pd.DataFrame({s.USER_ID: ["nobody"], s.ITEM_ID: ["nope"],
                                                   s.EVENT_TIMESTAMP: [now]}))
    user, item, session = fs.training_matrices(frame)
    np.testing.assert_array_equal(user[0], F.user_vector({}, now))
    np.testing.assert_array_equal(session[0], F.session_vector({}, now))


def test_timeout_gives_defaults_and_not_ok(feast_repo):
    _, store, _ = feast_repo
    values, ok = FO.fetch_user_features(store, "u1", deadline_s=0.0)
    assert not ok and values == F.default_row(F.USER_FIELDS + F.SESSION_FIELDS)


def test_training_and_serving_paths_give_equal_features(feast_repo):
    from tandem.streaming.feature_consumer import feast_sink

    paths, store, _ = feast_repo
    # the feature consumer's own sink (the production path), not a hand-wired offline_dir
    feast_sink(paths)(fs.session_frame([{
        s.USER_ID: "u1", s.EVENT_TIMESTAMP: T1 + pd.Timedelta(minutes=10),
        s.SESSION_LENGTH: 4, s.SESSION_START_TS: int(T1.value // 1e6),
        s.SESSION_LAST_TS: int(T1.value // 1e6) + 600_000, s.SESSION_RECENT_ITEMS: ["i2"],
        s.SESSION_RECENT_GENRES: ["Action"], "cnt_play": 1}]))
    now = T1 + pd.Timedelta(minutes=20)
    idx = np.array([3, 0, 2, 1])
    # training: point-in-time join of (u1, item, now) rows
    frame = fs.training_frame(store, pd.DataFrame({
        s.USER_ID: ["u1"] * len(idx), s.ITEM_ID: [ITEMS[i] for i in idx],
        s.EVENT_TIMESTAMP: [now] * len(idx)}))
    t_user, t_item, t_session = fs.training_matrices(frame)
    # serving: the user's online row once, the item table for the candidates
    values, ok = FO.fetch_user_features(store, "u1", deadline_s=5.0)
    assert ok and values[s.SESSION_LENGTH] == 4
    s_item = FO.ItemFeatureTable(store, ITEMS).take(idx, now)
    np.testing.assert_array_equal(t_item, s_item)
    np.testing.assert_array_equal(t_user, np.tile(F.user_vector(values, now), (len(idx), 1)))
    np.testing.assert_array_equal(t_session,
                                  np.tile(F.session_vector(values, now), (len(idx), 1)))
    assert t_session[0, F.SESSION_FEATURES.index("session_active")] == 1.0


def test_materialization_writes_in_batches_and_loses_no_row(tmp_path):
    """Feast's default converts a whole interval to protos in one batch (the 10m pipeline rung's
    1.57M rows took materialize to 6.6 GB); both profiles write 10k rows at a time, and every row
    of an interval larger than a batch arrives, batch boundaries included."""
    import sqlite3

    import yaml

    for profile in fs.PROFILES:
        text = fs.render(Paths(tmp_path / profile), profile, redis="127.0.0.1:1").joinpath(
            "feature_store.yaml").read_text()
        assert yaml.safe_load(text)["materialization"]["online_write_batch_size"] == 10_000
    paths = Paths(tmp_path / "many")
    n = 25_001
    frame = pd.DataFrame([user_row(f"u{k}", T1, float(k % 5)) for k in range(n)])
    frame.to_parquet(snapshot_folder(paths.user_features, T1) / "part-0.parquet", index=False)
    pd.DataFrame([item_row(0, T1)]).to_parquet(
        snapshot_folder(paths.item_features, T1) / "part-0.parquet", index=False)
    store = fs.apply(paths)
    assert store.config.materialization_config.online_write_batch_size == 10_000
    fs.materialize(paths, (T1 - timedelta(hours=1)).to_pydatetime(), T1.to_pydatetime(), store)
    with sqlite3.connect(paths.feast / "online.db") as db:
        stored = db.execute(f"SELECT COUNT(DISTINCT entity_key) FROM "
                            f"{store.project}_{s.USER_ACTIVITY_VIEW}").fetchone()[0]
    assert stored == n
    for k in (0, 9_999, 10_000, 20_000, n - 1):
        values, ok = FO.fetch_user_features(store, f"u{k}", deadline_s=5.0)
        assert ok and values["user_avg_rating"] == float(k % 5)
