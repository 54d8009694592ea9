"""jobs.ingest_events: exact counts, quarantine reasons, cross-hour dedup, idempotent re-runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tandem import schema as s

pytestmark = pytest.mark.spark

H0 = datetime(2024, 1, 1, 10, tzinfo=UTC)
H1, H2 = H0 + timedelta(hours=1), H0 + timedelta(hours=2)
T0 = int(H0.timestamp() * 1000)


def ev(i: int, **change) -> dict:
    base = {"event_id": f"e{i}", "event_type": "click", "user_id": f"u{i % 3}",
            "item_id": f"i{i}", "ts": T0 + i * 1000, "request_id": f"r{i}",
            "context": {"device": "tv", "country": "DE", "surface": "home"}}
    return {**base, **change}


def line(record: dict | str | bytes) -> bytes:
    if isinstance(record, bytes):
        return record
    return (record if isinstance(record, str) else json.dumps(record)).encode()


def land(paths, at: datetime, name: str, records: list) -> None:
    folder = Path(paths.landing_events) / f"date={at:%Y-%m-%d}" / f"hour={at:%H}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"".join(line(r) + b"\n" for r in records))


# 22 non-blank lines: 10 valid events, 3 duplicates (same file, other file, replay an hour
# later) and 9 invalid lines of distinct kinds.
INVALID = {
    "type:ts": ev(90, ts=str(T0)),
    "enum:event_type": ev(91, event_type="purchase"),
    "required:user_id": {k: v for k, v in ev(92).items() if k != "user_id"},
    "future_ts": ev(93, ts=T0 + 3 * 3_600_000),
    "minimum:ts": ev(94, ts=-1),
    "invalid_utf8": b'{"event_id": "e95", "user_id": "\xc3\x28"}',
    "maxLength:item_id": ev(96, item_id="x" * 65),
    "oversized_record": ev(97, session_id="s" * 70_000),
    "malformed_json": '{"event_id": "e98", "event_type": "click"',
}


def land_fixture(paths) -> None:
    inv = list(INVALID.values())
    land(paths, H0, "a.jsonl", [ev(1), ev(2), ev(3), ev(1), *inv[:3], ev(4), ev(5), ev(6)])
    land(paths, H0, "b.jsonl", [ev(7), "", ev(2, user_id="other"), *inv[3:], ev(8)])
    land(paths, H1, "c.jsonl", [ev(9), ev(3), ev(10)])


def _read(spark, root):
    from jobs.ingest_events import events_schema, quarantine_schema

    schema = quarantine_schema() if "quarantine" in str(root) else events_schema()
    return spark.read.schema(schema).parquet(str(root))


def _rows(spark, root, cols):
    return sorted(tuple(r) for r in _read(spark, root).select(*cols).collect())


def test_counts_partitions_and_quarantine(spark, paths):
    from jobs.ingest_events import run

    land_fixture(paths)
    counts = run(spark, paths, H0, H2)
    assert counts == {"read": 22, "valid": 10, "invalid": 9, "duplicate": 3, "files": 3}

    events = _read(spark, paths.events)
    per_hour = {(r.date, r.hour): r["count"] for r in events.groupBy("date", "hour").count()
                .collect()}
    assert per_hour == {("2024-01-01", 10): 8, ("2024-01-01", 11): 2}
    assert sorted(r.event_id for r in events.select("event_id").collect()) == sorted(
        f"e{i}" for i in range(1, 11))
    # the first copy (by file, then line) wins: e2 keeps user u2, not the later "other"
    e2 = events.where("event_id = 'e2'").first()
    assert e2.user_id == "u2" and e2.ctx_country == "DE" and e2.ts == T0 + 2000

    quarantine = _read(spark, paths.quarantine_events)
    assert sorted(r.reason for r in quarantine.select(s.REASON).collect()) == sorted(INVALID)
    bad = quarantine.where("reason = 'enum:event_type'").first()
    assert json.loads(bad.raw)["event_id"] == "e91"
    assert bad.source_file.endswith("a.jsonl") and bad.line_number == 5 and bad.hour == 10


def test_rerun_is_identical_and_never_duplicates(spark, paths):
    from jobs.ingest_events import run

    land_fixture(paths)
    cols = [s.EVENT_ID, s.USER_ID, s.TS, s.DATE, s.HOUR]
    first = run(spark, paths, H0, H2)
    rows = _rows(spark, paths.events, cols)
    qrows = _rows(spark, paths.quarantine_events, [s.REASON, s.RAW])
    assert run(spark, paths, H0, H2) == first
    assert _rows(spark, paths.events, cols) == rows
    assert _rows(spark, paths.quarantine_events, [s.REASON, s.RAW]) == qrows


def test_hourly_runs_equal_one_run_and_replays_are_dropped(spark, paths, tmp_path):
    """Hour by hour, e3's replay in hour 11 is found in the lake (lookback) and dropped."""
    from jobs.ingest_events import run
    from tandem.config import Paths

    land_fixture(paths)
    one = run(spark, paths, H0, H2)
    hourly = Paths(tmp_path / "hourly")
    land_fixture(hourly)
    c0, c1 = run(spark, hourly, H0, H1), run(spark, hourly, H1, H2)
    assert (c0["duplicate"], c1["duplicate"]) == (2, 1)
    assert c1 == {"read": 3, "valid": 2, "invalid": 0, "duplicate": 1, "files": 1}
    assert sum(c["valid"] for c in (c0, c1)) == one["valid"]
    cols = [s.EVENT_ID, s.USER_ID, s.TS, s.DATE, s.HOUR]
    assert _rows(spark, hourly.events, cols) == _rows(spark, paths.events, cols)
    # re-running the earlier hour afterwards changes nothing either
    assert run(spark, hourly, H0, H1) == c0
    assert _rows(spark, hourly.events, cols) == _rows(spark, paths.events, cols)


def test_a_file_read_in_several_splits_keeps_its_line_numbers(spark, paths):
    """Line by line, a big landing file is cut into splits; numbers stay the file's lines."""
    from jobs.ingest_events import run

    records = [ev(i) for i in range(2_000)]
    records[1_500] = INVALID["enum:event_type"]
    land(paths, H0, "big.jsonl", records)
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(64 << 10))  # ~6 splits
    try:
        counts = run(spark, paths, H0, H1)
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    assert (counts["valid"], counts["invalid"]) == (1_999, 1)
    bad = _read(spark, paths.quarantine_events).first()
    assert (bad.line_number, bad.reason) == (1_500, "enum:event_type")


def test_empty_interval_writes_nothing(spark, paths):
    from jobs.ingest_events import run

    assert run(spark, paths, H0, H1) == {"read": 0, "valid": 0, "invalid": 0, "duplicate": 0,
                                         "files": 0}


@pytest.mark.slow
def test_world_generator_data_end_to_end(spark, paths):
    """A tiny synthetic world with re-delivered events: ingest, label and sample it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from jobs.build_labels import LabelsConfig, closing_interval
    from jobs.build_labels import run as build_labels
    from jobs.ingest_events import run
    from jobs.negative_sampling import run as negative_sampling
    from tandem.data.world import World
    from tandem.data.world_config import WorldConfig

    cfg = WorldConfig(n_users=40, n_items=30, n_events_target=1_500, days=1, late_share=0.0,
                      duplicate_share=0.05, start_ms=T0 - 10 * 3_600_000)
    world = World.generate(cfg)
    world.write(paths)
    table = pa.concat_tables(list(world.generate_events()))
    distinct = len(pc.unique(table[s.EVENT_ID]))
    assert distinct < table.num_rows  # some events were delivered twice

    day = H0.replace(hour=0)
    counts = run(spark, paths, day, day + timedelta(days=2))
    assert (counts["read"], counts["valid"], counts["invalid"], counts["duplicate"]) == (
        table.num_rows, distinct, 0, table.num_rows - distinct)

    first = pc.unique(table.filter(pc.equal(table[s.EVENT_TYPE], s.IMPRESSION))[s.EVENT_ID])
    imp = table.filter(pc.is_in(table[s.EVENT_ID], first))
    in_day = pc.and_(pc.greater_equal(imp[s.TS], T0 - 10 * 3_600_000),
                     pc.less(imp[s.TS], T0 + 14 * 3_600_000))
    labels = build_labels(spark, paths, *closing_interval(day, day + timedelta(days=1),
                                                         LabelsConfig()))
    assert labels["mode"] == "impressions"
    assert labels["rows"] == len(pc.unique(imp.filter(in_day)[s.EVENT_ID]))
    assert 0 < labels["positives"] < labels["rows"]
    negatives = negative_sampling(spark, paths, day, day + timedelta(days=1))
    assert negatives["ranking_impressed"] == labels["rows"] - labels["positives"]
    assert negatives["retrieval"] > 0 and negatives["ranking_sampled"] > 0
