"""jobs/build_features.py on a hand-made lake whose right answers are stated in the tests."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tandem import schema as s
from tandem.config import Paths
from tandem.data.dataset import (
    EVENT_ARROW_SCHEMA,
    EVENT_COLUMNS,
    ITEM_ARROW_SCHEMA,
    ITEM_COLUMNS,
    USER_ARROW_SCHEMA,
    USER_COLUMNS,
    conform,
    positives,
)
from tandem.features import entity as feat

pytestmark = pytest.mark.spark

END = datetime(2024, 1, 10, tzinfo=UTC)
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
END_MS = int(END.timestamp() * 1000)


LANDED = "landed"  # an event dict's landing time (epoch ms) when it is not its ts


def write_lake(paths, events: list[dict], items: list[dict], users: list[dict]) -> None:
    """Write contract frames as the lake's parquet (events partitioned by landing date/hour:
    ``landed`` when given, else ``ts``)."""
    ev = conform(pd.DataFrame([{k: v for k, v in e.items() if k != LANDED} for e in events]),
                 EVENT_COLUMNS)
    ev[s.EVENT_ID] = [f"e{i}" for i in range(len(ev))]
    stamp = pd.to_datetime([e.get(LANDED, e[s.TS]) for e in events], unit="ms", utc=True)
    table = pa.Table.from_pandas(ev, schema=EVENT_ARROW_SCHEMA, preserve_index=False)
    table = table.append_column(s.DATE, pa.array(stamp.strftime("%Y-%m-%d").to_numpy()))
    table = table.append_column(s.HOUR, pa.array(stamp.hour.to_numpy().astype("int32")))
    pq.write_to_dataset(table, paths.events, partition_cols=[s.DATE, s.HOUR])
    write_profiles(paths, items, users)


def write_profiles(paths, items: list[dict], users: list[dict]) -> None:
    """lake/items and lake/users (replacing what was there)."""
    for frame, cols, schema, out in ((items, ITEM_COLUMNS, ITEM_ARROW_SCHEMA, paths.items),
                                     (users, USER_COLUMNS, USER_ARROW_SCHEMA, paths.users)):
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(conform(pd.DataFrame(frame), cols), schema=schema,
                                            preserve_index=False), out / "part-0.parquet")


def tiny_lake(paths) -> None:
    """u1 is active around END, u2 liked i1 ten days before; i3 has no events."""
    ev = [
        {"event_type": s.RATING, "user_id": "u1", "item_id": "i1", "ts": END_MS - 30 * MIN,
         "value": 5.0},
        {"event_type": s.CLICK, "user_id": "u1", "item_id": "i2", "ts": END_MS - 2 * HOUR},
        {"event_type": s.IMPRESSION, "user_id": "u1", "item_id": "i2", "ts": END_MS - 3 * HOUR},
        {"event_type": s.RATING, "user_id": "u1", "item_id": "i2", "ts": END_MS - 3 * DAY,
         "value": 2.0},
        {"event_type": s.LIKE, "user_id": "u2", "item_id": "i1", "ts": END_MS - 10 * DAY},
        {"event_type": s.CLICK, "user_id": "u1", "item_id": "i1", "ts": END_MS + HOUR},  # after
    ]
    items = [{"item_id": "i1", "title": "A", "genres": ["Action", "Drama"], "created_at": 1,
              "release_year": 1995},
             {"item_id": "i2", "title": "B", "genres": ["Comedy"], "created_at": 2},
             {"item_id": "i3", "title": "C", "genres": ["Nope"], "created_at": 3}]
    users = [{"user_id": "u1", "signup_ts": 5, "age_bucket": "25-34", "gender": "F"},
             {"user_id": "u2", "signup_ts": 6}]
    write_lake(paths, ev, items, users)


def _read(path) -> pd.DataFrame:
    return pd.read_parquet(path).drop(columns=[s.DATE, s.HOUR])


def _comparable(frame: pd.DataFrame, keep_time: bool = False) -> list[tuple]:
    """Rows as sorted tuples (lists as tuples), without ``event_timestamp`` unless kept."""
    frame = frame.reset_index()
    cols = sorted(c for c in frame.columns if keep_time or c != s.EVENT_TIMESTAMP)
    return sorted(tuple(tuple(v) if hasattr(v, "__len__") and not isinstance(v, str) else v
                        for v in row) for row in frame[cols].itertuples(index=False))


def latest(frame: pd.DataFrame, key: str, at: datetime) -> pd.DataFrame:
    """Each entity's latest row with ``event_timestamp <= at``: what Feast joins and serves."""
    seen = frame[frame[s.EVENT_TIMESTAMP] <= pd.Timestamp(at)]
    return seen.sort_values(s.EVENT_TIMESTAMP).groupby(key).tail(1).set_index(key)


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    """A three-day backfill ending at END over the tiny lake: (paths, counts)."""
    from jobs import build_features

    paths = Paths(tmp_path_factory.mktemp("build-features"))
    tiny_lake(paths)
    return paths, build_features.run(spark, paths, END - timedelta(days=3), END)


def test_snapshot_at_end_has_the_stated_windows(built):
    paths, counts = built
    # rows only where values changed: u1 at all three snapshots (its rating leaves the 24h window
    # on the second), u2 once; i1 twice, i2 three times, i3 (no events) once
    assert counts == {"snapshots": 3, "user_rows": 4, "user_base": None, "item_rows": 6,
                      "item_base": None}
    assert str(_read(paths.user_features)[s.EVENT_TIMESTAMP].dt.tz) == "UTC"
    assert sorted(p.name for p in paths.user_features.iterdir()) == [
        "date=2024-01-07", "date=2024-01-08", "date=2024-01-09"]
    assert [p.name for p in (paths.user_features / "date=2024-01-09").iterdir()] == ["hour=23"]

    users = latest(_read(paths.user_features), s.USER_ID, END)
    u1, u2 = users.loc["u1"], users.loc["u2"]
    assert (u1.user_events_1h, u1.user_events_24h, u1.user_events_7d, u1.user_events_total) == (
        1, 2, 3, 3)  # the impression is not an engagement, the click after END is not seen
    assert u1.user_positives_7d == 2  # rating 5 and the click; rating 2 is not positive
    assert u1.user_ratings_total == 2
    assert u1.user_avg_rating == pytest.approx((5 + 2 + 5 * 3.5) / 7)
    assert u1.user_last_event_ts == END_MS - 30 * MIN
    assert (u1.user_age_bucket, u1.user_gender, u1.user_signup_ts) == ("25-34", "F", 5)
    aff = dict(zip(feat.GENRE_VOCAB, u1.user_genre_affinity, strict=True))
    assert (aff["Action"], aff["Drama"], aff["Comedy"]) == pytest.approx((0.25, 0.25, 0.5))
    assert sum(aff.values()) == pytest.approx(1.0)
    assert (u2.user_events_7d, u2.user_events_total, u2.user_positives_7d) == (0, 1, 0)
    assert u2.user_avg_rating == pytest.approx(3.5) and u2.user_gender == ""
    assert u2[s.EVENT_TIMESTAMP] == pd.Timestamp(END - timedelta(days=2))  # unchanged since

    items = latest(_read(paths.item_features), s.ITEM_ID, END)
    i1, i2, i3 = items.loc["i1"], items.loc["i2"], items.loc["i3"]
    assert (i1.item_pop_1h, i1.item_pop_24h, i1.item_pop_7d, i1.item_pop_total) == (1, 1, 1, 2)
    assert (i2.item_pop_1h, i2.item_pop_24h, i2.item_pop_7d) == (0, 1, 2)
    assert (i2.item_impressions_7d, i2.item_clicks_7d) == (1, 1)
    assert i2.item_ctr == pytest.approx((1 + 1) / (1 + 1 + 20))
    assert i3.item_ctr == pytest.approx(feat.DEFAULT_CTR)
    assert (i3.item_pop_total, i3.item_last_event_ts, i3.item_avg_rating) == (0, 0, 3.5)
    assert list(i1.item_genres) == ["Action", "Drama"] and i1.item_release_year == 1995


def test_each_day_sees_only_its_past_and_reruns_do_not_duplicate(spark, built):
    from jobs import build_features

    paths, counts = built
    u1 = _read(paths.user_features).query("user_id == 'u1'").sort_values(s.EVENT_TIMESTAMP)
    # two days before END only the rating at END - 3 days had happened
    assert list(u1.user_events_total) == [1, 1, 3]
    assert list(u1.user_events_7d) == [1, 1, 3]
    assert list(u1.user_events_24h) == [1, 0, 2]
    before = {k: _read(p) for k, p in (("u", paths.user_features), ("i", paths.item_features))}
    # the same interval again: the same rows
    assert build_features.run(spark, paths, END - timedelta(days=3), END) == counts
    for k, p in (("u", paths.user_features), ("i", paths.item_features)):
        assert _comparable(_read(p), keep_time=True) == _comparable(before[k], keep_time=True)
    # the last day alone: no state at or before its start, so every entity gets a row at END,
    # replacing (not adding to) the rows at END; the values are the same
    again = build_features.run(spark, paths, END - timedelta(days=1), END)
    assert (again["user_rows"], again["item_rows"]) == (2, 3)
    users = _read(paths.user_features)
    assert (users[s.EVENT_TIMESTAMP] == pd.Timestamp(END)).sum() == 2 and len(users) == 5
    assert _comparable(latest(users, s.USER_ID, END)) == _comparable(
        latest(before["u"], s.USER_ID, END))


@pytest.mark.feast
def test_feast_reads_the_latest_row_however_old(built):
    """Rows come only when values change (and no view has a TTL): u2's only row (two days
    before END) and i3's are what Feast serves and joins a month later."""
    from tandem.features import feature_store as fs
    from tandem.features import online as FO

    paths, _ = built
    store = fs.apply(paths)
    fs.materialize(paths, END - timedelta(days=4), END, store)
    values, ok = FO.fetch_user_features(store, "u2", deadline_s=5.0)
    assert ok and (values["user_events_total"], values["user_avg_rating"]) == (1, 3.5)
    later = pd.Timestamp(END + timedelta(days=30))
    frame = store.get_historical_features(
        entity_df=pd.DataFrame({s.USER_ID: ["u1", "u2"], s.ITEM_ID: ["i3", "i1"],
                                s.EVENT_TIMESTAMP: [later, later]}),
        features=[f"{s.USER_PROFILE_VIEW}:user_gender", f"{s.USER_ACTIVITY_VIEW}:user_events_total",
                  f"{s.ITEM_CONTENT_VIEW}:item_genres",
                  f"{s.ITEM_POPULARITY_VIEW}:item_pop_total"]).to_df().set_index(s.USER_ID)
    assert (frame.loc["u1", "user_gender"], frame.loc["u1", "user_events_total"]) == ("F", 3)
    assert (frame.loc["u2", "user_events_total"], frame.loc["u2", "item_pop_total"]) == (1, 2)
    assert list(frame.loc["u1", "item_genres"]) == ["Nope"]


def test_end_must_be_on_an_hour(spark, paths):
    from jobs import build_features

    with pytest.raises(ValueError, match="whole hour"):
        build_features.run(spark, paths, END - timedelta(days=1), END + timedelta(minutes=5))


# ------------------------------------------------------- incremental runs vs full recomputation

W0 = datetime(2024, 3, 1, tzinfo=UTC)
W0_MS = int(W0.timestamp() * 1000)
N_USERS = 40
LOOKBACK_DAYS = 2  # short, so events leave every window (7d is capped to it) within the world
GENRES = [["Action", "Drama"], ["Comedy"], ["Nope"], [], ["Drama", "Horror", "War"],
          ["Action"], ["Sci-Fi", "Action", "Nope"], ["Children's"]]


def world_events(seed: int = 7) -> list[dict]:
    """~600 events over 5 days from 40 users on 8 items; ~15% land 1-40 hours late, ~3% with a
    client clock up to 5 minutes ahead (landed in the hour before their ts)."""
    rng = np.random.default_rng(seed)
    events = []
    for _ in range(600):
        ts = W0_MS + int(rng.integers(0, 5 * DAY))
        etype = str(rng.choice([s.IMPRESSION, s.IMPRESSION, s.CLICK, s.PLAY, s.LIKE, s.RATING,
                                s.DISLIKE, s.SHARE]))
        event = {"event_type": etype, "user_id": f"u{rng.integers(0, N_USERS)}",
                 "item_id": f"i{rng.integers(0, 8)}", "ts": ts}
        if etype == s.RATING:
            event["value"] = float(rng.choice([1.0, 2.5, 3.7, 4.0, 4.25, 5.0]))
        if etype == s.PLAY:
            event["dwell_ms"] = int(rng.integers(0, 60_000))
        draw = rng.random()
        if draw < 0.15:
            event[LANDED] = ts + int(rng.integers(1, 41)) * HOUR
        elif draw < 0.18:
            event["ts"] = ts // HOUR * HOUR + HOUR + int(rng.integers(0, 5 * MIN))
            event[LANDED] = ts
        events.append(event)
    return events


def world_profiles(version: int) -> tuple[list[dict], list[dict]]:
    """Items and users; version 1 changes u1's gender and adds a user and an item."""
    items = [{"item_id": f"i{k}", "title": f"T{k}", "genres": g, "created_at": 10 + k,
              "release_year": 1990 + k} for k, g in enumerate(GENRES)]
    users = [{"user_id": f"u{k}", "signup_ts": 100 + k, "age_bucket": "25-34",
              "gender": "F" if k % 2 else "M"} for k in range(N_USERS - 4)]  # 4 without
    if version:
        users[1]["gender"] = "M"
        users.append({"user_id": "u_new", "signup_ts": 999, "age_bucket": "56+"})
        items.append({"item_id": "i_new", "title": "N", "genres": ["War"], "created_at": 77})
    return items, users


def expected(events: pd.DataFrame, items: list[dict], users: list[dict],
             at: datetime) -> tuple[dict, dict]:
    """The full recomputation at ``at`` (module docstring of jobs/build_features.py): stored
    fields per user and per item, every known entity."""
    t, lookback = int(at.timestamp() * 1000), LOOKBACK_DAYS * DAY
    landed = events[events["hour_ms"] < t]
    window = landed[landed["hour_ms"] >= t - lookback]

    def within(frame: pd.DataFrame, span: int) -> pd.DataFrame:
        return frame[frame["hour_ms"] >= t - min(span, lookback)]

    genres = {i["item_id"]: [g for g in dict.fromkeys(i["genres"]) if g in feat.GENRE_VOCAB]
              for i in items}
    profile = {u["user_id"]: u for u in users}
    catalog = {i["item_id"]: i for i in items}

    def common(frame: pd.DataFrame, mine: pd.DataFrame) -> dict:
        engaged = frame[frame.event_type != s.IMPRESSION]
        ratings = frame[(frame.event_type == s.RATING) & frame.value.notna()]
        last = mine[mine.event_type != s.IMPRESSION].ts
        return {"n": [len(within(engaged, span)) for span in (HOUR, DAY, 7 * DAY, lookback)],
                "ratings": len(ratings),
                "avg": (ratings.value.sum() + 5 * 3.5) / (len(ratings) + 5),
                "last": int(last.max()) if len(engaged) else 0}

    out_users = {}
    for uid in sorted(set(profile) | set(window.user_id)):
        mine = window[window.user_id == uid]
        c = common(mine, landed[landed.user_id == uid])
        weights = np.zeros(feat.N_GENRES)
        for item in mine[mine.positive].item_id:
            for g in genres.get(item, []):
                weights[feat.GENRE_VOCAB.index(g)] += 1 / len(genres[item])
        p = profile.get(uid, {})
        out_users[uid] = {
            "user_age_bucket": p.get("age_bucket") or "", "user_gender": p.get("gender") or "",
            "user_signup_ts": p.get("signup_ts", 0), "user_avg_rating": c["avg"],
            "user_ratings_total": c["ratings"],
            "user_genre_affinity": list(weights / weights.sum() if weights.sum() else weights),
            "user_events_1h": c["n"][0], "user_events_24h": c["n"][1],
            "user_events_7d": c["n"][2], "user_events_total": c["n"][3],
            "user_positives_7d": int(within(mine, 7 * DAY).positive.sum()),
            "user_last_event_ts": c["last"]}
    out_items = {}
    for iid in sorted(set(catalog) | set(window.item_id)):
        mine = window[window.item_id == iid]
        c = common(mine, landed[landed.item_id == iid])
        recent = within(mine, 7 * DAY)
        imps = int((recent.event_type == s.IMPRESSION).sum())
        clicks = int((recent.event_type == s.CLICK).sum())
        i = catalog.get(iid, {})
        out_items[iid] = {
            "item_genres": list(i.get("genres", [])), "item_release_year": i.get("release_year", 0),
            "item_duration_s": 0, "item_created_at": i.get("created_at", 0),
            "item_pop_1h": c["n"][0], "item_pop_24h": c["n"][1], "item_pop_7d": c["n"][2],
            "item_pop_total": c["n"][3], "item_impressions_7d": imps, "item_clicks_7d": clicks,
            "item_ctr": (clicks + 1) / (imps + 21), "item_avg_rating": c["avg"],
            "item_ratings_total": c["ratings"], "item_last_event_ts": c["last"]}
    return out_users, out_items


def assert_same(actual: pd.DataFrame, want: dict, fields, at: datetime) -> None:
    """Every entity's latest row at ``at`` equals ``want`` (defaults where it has neither)."""
    rows = latest(actual, actual.columns[0], at)
    defaults = feat.default_row(fields)
    for entity in sorted(set(rows.index) | set(want)):
        got = rows.loc[entity].to_dict() if entity in rows.index else defaults
        exp = want.get(entity, defaults)
        for f in fields:
            g, e = got[f.name], exp[f.name]
            where = f"{entity}.{f.name} at {at:%m-%d %H:%M}"
            if f.dtype == "string_list":
                assert list(g) == list(e), where
            elif f.dtype == "float32_list":
                assert list(g) == pytest.approx(list(e), abs=1e-6), where
            elif f.dtype == "float32":
                assert g == pytest.approx(e, rel=1e-6), where
            else:
                assert g == e, where


@pytest.mark.slow
def test_incremental_runs_equal_a_full_recomputation(spark, tmp_path):
    """A backfill, hourly and daily runs, a re-run, a profile change and runs that find the old
    events gone: at every snapshot, each entity's latest row is the full recomputation."""
    from jobs import build_features

    paths = Paths(tmp_path)
    raw = world_events()
    items, users = world_profiles(0)
    write_lake(paths, raw, items, users)
    events = pd.DataFrame(raw)
    events["hour_ms"] = events.get(LANDED).fillna(events.ts).astype("int64") // HOUR * HOUR
    events["positive"] = positives(conform(events, EVENT_COLUMNS), 30_000)
    cfg = {"lookback_days": LOOKBACK_DAYS}
    profiles_at: dict[datetime, tuple] = {}

    def run(start: datetime, end: datetime) -> dict:
        counts = build_features.run(spark, paths, start, end, cfg)
        for at in build_features.snapshot_times(start, end):
            profiles_at[at] = (items, users)
        return counts

    hour = timedelta(hours=1)
    t = W0 + timedelta(days=2)
    first = run(W0, t)  # a backfill: snapshots at W0 + 1d and W0 + 2d, no base
    assert first["snapshots"] == 2 and first["user_base"] is None
    for _ in range(2):  # hourly runs roll forward from the previous hour's state
        counts = run(t, t + hour)
        assert counts["user_base"] == t.isoformat()
        assert 0 < counts["user_rows"] < N_USERS * 3 // 4  # only the users whose values changed
        t += hour
    daily = run(t, t + timedelta(days=1))  # a daily run rolls forward a whole day
    assert daily["item_base"] == t.isoformat()
    assert run(t, t + timedelta(days=1)) == daily  # a re-run of the same interval
    t += timedelta(days=1)
    # old landing hours gone: a warm run reads only its own hour and the stored partials
    for folder in sorted(paths.events.glob("date=*/hour=*")):
        day, h = folder.parent.name.split("=")[1], int(folder.name.split("=")[1])
        if datetime.fromisoformat(day).replace(hour=h, tzinfo=UTC) < t:
            shutil.rmtree(folder)
    items, users = world_profiles(1)
    write_profiles(paths, items, users)
    changed = run(t, t + hour)  # u1's gender changed; u_new and i_new are new
    assert changed["user_base"] == t.isoformat()

    user_rows, item_rows = _read(paths.user_features), _read(paths.item_features)
    now = user_rows[user_rows[s.EVENT_TIMESTAMP] == pd.Timestamp(t + hour)]
    assert {"u1", "u_new"} <= set(now.user_id) and "i_new" in set(
        item_rows[item_rows[s.EVENT_TIMESTAMP] == pd.Timestamp(t + hour)].item_id)
    for at, (its, us) in sorted(profiles_at.items()):
        want_users, want_items = expected(events, its, us, at)
        assert_same(user_rows, want_users, feat.USER_FIELDS, at)
        assert_same(item_rows, want_items, feat.ITEM_FIELDS, at)
    # and no row repeats its entity's previous one
    for frame, key in ((user_rows, s.USER_ID), (item_rows, s.ITEM_ID)):
        for _, rows in frame.sort_values(s.EVENT_TIMESTAMP).groupby(key):
            values = [_comparable(rows.iloc[[i]]) for i in range(len(rows))]
            assert all(a != b for a, b in zip(values, values[1:], strict=False))
