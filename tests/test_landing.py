"""Landing writer: JSON lines by arrival hour, parquet partitions, items/users, rewrites."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tandem import schema as s
from tandem.data.dataset import EVENT_ARROW_SCHEMA, ITEM_COLUMNS, USER_COLUMNS, conform
from tandem.data.landing import (
    event_json_lines,
    event_records,
    write_events_parquet,
    write_items,
    write_landing_events,
    write_users,
)
from tandem.validation import validate_event

H = 3_600_000
T0 = 1_704_153_600_000  # 2024-01-02T00:00:00Z


def events() -> pd.DataFrame:
    """Four events: two in 2024-01-01 23h (one arriving after midnight), two on 01-02 00h/05h."""
    return pd.DataFrame({
        s.EVENT_ID: ["e1", "e2", "e3", "e4"],
        s.EVENT_TYPE: [s.IMPRESSION, s.CLICK, s.RATING, s.PLAY],
        s.USER_ID: ["u1", "u1", "u2", "u/3"],
        s.ITEM_ID: ["i1", "i1", "i2", 'i"4'],
        s.TS: [T0 - H + 10, T0 - H + 20, T0 + 5, T0 + 5 * H],
        s.REQUEST_ID: ["r1", "r1", None, None],
        s.POSITION: [0, 0, None, None],
        s.DWELL_MS: [None, None, None, 61_000],
        s.VALUE: [None, None, 4.5, None],
        s.CTX_DEVICE: ["tv", "tv", None, None],
        s.CTX_COUNTRY: ["US", None, None, None],
        s.PROPENSITY: [0.25, None, None, None],
        "arrival_ts": [T0 - H + 11, T0 + 30, T0 + 6, T0 + 5 * H + 1],
    })


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_lines_nest_context_and_validate():
    recs = event_records(events())
    assert recs[0]["context"] == {"device": "tv", "country": "US", "surface": None}
    assert recs[1]["context"] == {"device": "tv", "country": None, "surface": None}
    assert recs[2]["context"] is None  # all-null context is null, not an empty object
    assert recs[0]["position"] == 0 and isinstance(recs[0]["position"], int)
    assert recs[2]["value"] == 4.5 and recs[3]["dwell_ms"] == 61_000
    assert recs[3]["user_id"] == "u/3" and recs[3]["item_id"] == 'i"4'  # escaping survives
    assert "arrival_ts" not in recs[0] and not any(k.startswith("ctx_") for k in recs[0])
    for r in recs:
        validate_event(r)
    assert event_json_lines(events().iloc[:0]) == ""


def test_landing_partitions_by_arrival_and_rewrite_replaces(paths):
    root = paths.landing_events
    written = write_landing_events(events(), root, "batch", arrival="arrival_ts")
    assert written == {"date=2024-01-01/hour=23": 1, "date=2024-01-02/hour=00": 2,
                       "date=2024-01-02/hour=05": 1}
    late = read_lines(root / "date=2024-01-02/hour=00/batch.jsonl")
    assert [r["event_id"] for r in late] == ["e2", "e3"]  # e2 happened at 23h, arrived at 00h
    # rerun with the same name replaces, a file of another writer stays
    other = root / "date=2024-01-02/hour=00/kafka-0.jsonl"
    other.write_text('{"x": 1}\n')
    write_landing_events(events(), root, "batch", arrival="arrival_ts")
    assert len(read_lines(root / "date=2024-01-02/hour=00/batch.jsonl")) == 2
    assert other.read_text() == '{"x": 1}\n'
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.jsonl"))
    assert files == ["date=2024-01-01/hour=23/batch.jsonl", "date=2024-01-02/hour=00/batch.jsonl",
                     "date=2024-01-02/hour=00/kafka-0.jsonl",
                     "date=2024-01-02/hour=05/batch.jsonl"]
    assert not list(root.rglob(".*tmp*"))


def test_landing_default_arrival_is_ts_and_arrow_input_matches(paths, tmp_path):
    written = write_landing_events(events(), paths.landing_events, "a")
    assert written == {"date=2024-01-01/hour=23": 2, "date=2024-01-02/hour=00": 1,
                       "date=2024-01-02/hour=05": 1}
    frame = conform(events(), tuple(EVENT_ARROW_SCHEMA.names))
    table = pa.Table.from_pandas(frame, preserve_index=False).cast(EVENT_ARROW_SCHEMA)
    write_landing_events(table, tmp_path / "arrow", "a")
    for rel in written:
        assert (tmp_path / "arrow" / rel / "a.jsonl").read_text() == \
            (paths.landing_events / rel / "a.jsonl").read_text()


def test_events_parquet_partitions(tmp_path):
    written = write_events_parquet(events(), tmp_path / "ev", "chunk", by="arrival_ts")
    assert written == {"date=2024-01-01/hour=23": 1, "date=2024-01-02/hour=0": 2,
                       "date=2024-01-02/hour=5": 1}
    t = pq.read_table(tmp_path / "ev" / "date=2024-01-02/hour=0/chunk.parquet")
    assert t.schema == EVENT_ARROW_SCHEMA
    assert t[s.EVENT_ID].to_pylist() == ["e2", "e3"]
    write_events_parquet(events(), tmp_path / "ev", "chunk", by="arrival_ts")
    assert len(list((tmp_path / "ev").rglob("*.parquet"))) == 3


def test_items_and_users_parquet_overwrite(paths):
    items = pd.DataFrame({s.ITEM_ID: ["1", "2"], s.TITLE: ["A", "B"],
                          s.GENRES: [["Drama"], []], s.RELEASE_YEAR: [1999, None],
                          s.CREATED_AT: [5, 6]})
    path = write_items(items, paths)
    t = pq.read_table(paths.items)
    assert path.parent == paths.items and t.column_names == list(ITEM_COLUMNS)
    assert t.schema.field(s.GENRES).type == pa.list_(pa.string())
    assert t[s.GENRES].to_pylist() == [["Drama"], []]
    assert t[s.RELEASE_YEAR].to_pylist() == [1999, None]
    write_items(items.iloc[:1], paths)  # rewrite replaces, never appends
    assert pq.read_table(paths.items).num_rows == 1
    assert len(list(paths.items.glob("*.parquet"))) == 1

    users = pd.DataFrame({s.USER_ID: ["u1"], s.SIGNUP_TS: [7], s.AGE_BUCKET: ["18-24"]})
    write_users(users, paths)
    u = pq.read_table(paths.users)
    assert u.column_names == list(USER_COLUMNS)
    assert u.to_pylist() == [{s.USER_ID: "u1", s.SIGNUP_TS: 7, s.AGE_BUCKET: "18-24",
                              s.GENDER: None, s.OCCUPATION: None, s.COUNTRY: None}]
