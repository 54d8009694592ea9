"""jobs/build_features.py on a hand-made lake whose right answers are stated in the tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tandem import features as feat
from tandem import schema as s
from tandem.config import Paths
from tandem.dataset import (
    EVENT_ARROW_SCHEMA,
    EVENT_COLUMNS,
    ITEM_ARROW_SCHEMA,
    ITEM_COLUMNS,
    USER_ARROW_SCHEMA,
    USER_COLUMNS,
    conform,
)

pytestmark = pytest.mark.spark

END = datetime(2024, 1, 10, tzinfo=UTC)
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
END_MS = int(END.timestamp() * 1000)


def write_lake(paths, events: list[dict], items: list[dict], users: list[dict]) -> None:
    """Write contract frames as the lake's parquet (events partitioned by date/hour)."""
    ev = conform(pd.DataFrame(events), EVENT_COLUMNS)
    ev[s.EVENT_ID] = [f"e{i}" for i in range(len(ev))]
    stamp = pd.to_datetime(ev[s.TS], unit="ms", utc=True)
    table = pa.Table.from_pandas(ev, schema=EVENT_ARROW_SCHEMA, preserve_index=False)
    table = table.append_column(s.DATE, pa.array(stamp.dt.strftime("%Y-%m-%d")))
    table = table.append_column(s.HOUR, pa.array(stamp.dt.hour.astype("int32")))
    pq.write_to_dataset(table, paths.events, partition_cols=[s.DATE, s.HOUR])
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
    return pd.read_parquet(path)


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    """A three-day backfill ending at END over the tiny lake: (paths, counts)."""
    from jobs import build_features

    paths = Paths(tmp_path_factory.mktemp("build-features"))
    tiny_lake(paths)
    return paths, build_features.run(spark, paths, END - timedelta(days=3), END)


def test_snapshot_at_end_has_the_stated_windows(built):
    paths, counts = built
    assert counts == {"snapshots": 3, "user_rows": 6, "item_rows": 9}
    assert str(_read(paths.user_features)[s.EVENT_TIMESTAMP].dt.tz) == "UTC"
    assert sorted(p.name for p in paths.user_features.iterdir()) == [
        "date=2024-01-07", "date=2024-01-08", "date=2024-01-09"]

    users = _read(paths.user_features)
    users = users[users[s.EVENT_TIMESTAMP] == END].set_index("user_id")
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

    items = _read(paths.item_features)
    items = items[items[s.EVENT_TIMESTAMP] == END].set_index("item_id")
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
    assert build_features.run(spark, paths, END - timedelta(days=1), END)["user_rows"] == 2
    assert len(_read(paths.user_features)) == 6  # date=2024-01-09 replaced, not appended
    assert len(_read(paths.item_features)) == 9


def test_end_must_be_on_an_hour(spark, paths):
    from jobs import build_features

    with pytest.raises(ValueError, match="whole hour"):
        build_features.run(spark, paths, END - timedelta(days=1), END + timedelta(minutes=5))
