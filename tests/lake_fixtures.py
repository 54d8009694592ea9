"""Hand-built lake events for the Spark job tests (written straight to lake/events)."""

from __future__ import annotations

from datetime import UTC, datetime

from tandem import schema as s

DAY = datetime(2024, 1, 1, tzinfo=UTC)
T0 = int(DAY.timestamp() * 1000)
MIN = 60_000
HOUR_MS = 60 * MIN


def ev(event_id: str, event_type: str, user: str, item: str, ts: int, **more) -> dict:
    return {s.EVENT_ID: event_id, s.EVENT_TYPE: event_type, s.USER_ID: user, s.ITEM_ID: item,
            s.TS: ts, **more}


def write_lake_events(spark, paths, events: list[dict]) -> None:
    """Write events into lake/events, partitioned by arrival hour (``arrival`` ms, else ts)."""
    from tandem.spark.tables import events_schema

    schema = events_schema()
    names = [n for n in schema.names if n not in (s.DATE, s.HOUR)]
    rows = []
    for e in events:
        at = datetime.fromtimestamp(e.get("arrival", e[s.TS]) / 1000, tz=UTC)
        rows.append((*[e.get(n) for n in names], f"{at:%Y-%m-%d}", at.hour))
    df = spark.createDataFrame(rows, schema).repartition(1)
    df.write.mode("append").partitionBy(s.DATE, s.HOUR).parquet(str(paths.events))
