"""The Spark line validator names the same reason as the Python validator on the same records."""

from __future__ import annotations

import json

import pytest

from tandem.validation import MAX_CLOCK_SKEW_MS, ContractError, validate_event

pytestmark = pytest.mark.spark

REF_MS = 1_700_003_600_000  # the judged landing hour's end
GOOD = {"event_id": "e1", "event_type": "click", "user_id": "u1", "item_id": "i1",
        "ts": 1_700_000_000_000, "session_id": "s1", "request_id": "r1", "position": 3,
        "dwell_ms": None, "value": None,
        "context": {"device": "tv", "country": "DE", "surface": "home"},
        "experiment": "exp1", "variant": "B", "model_version": "7", "propensity": 0.25}


def _without(*keys: str) -> dict:
    return {k: v for k, v in GOOD.items() if k not in keys}


# (record or raw line, expected reason or None)
CASES: list[tuple[object, str | None]] = [
    (GOOD, None),
    ({"event_id": "m", "event_type": "rating", "user_id": "1", "item_id": "2", "ts": 0,
      "value": 4.5}, None),
    ({**GOOD, "ts": 1.7e12}, None),  # integral float: an integer for JSON Schema
    ({**GOOD, "context": None, "position": None, "propensity": 1}, None),
    ({**GOOD, "event_type": "purchase"}, "enum:event_type"),
    ({**GOOD, "event_type": 5}, "enum:event_type"),  # enum sorts before type
    ({**GOOD, "user_id": None}, "type:user_id"),
    ({**GOOD, "item_id": ""}, "minLength:item_id"),
    ({**GOOD, "ts": "1700000000000"}, "type:ts"),
    ({**GOOD, "ts": 1.5}, "type:ts"),
    ({**GOOD, "ts": True}, "type:ts"),
    ({**GOOD, "ts": -5}, "minimum:ts"),
    ({**GOOD, "ts": -1.5}, "minimum:ts"),  # minimum sorts before type
    ({**GOOD, "ts": 10**14}, "maximum:ts"),
    ({**GOOD, "item_id": "x" * 65}, "maxLength:item_id"),
    ({**GOOD, "position": -1}, "minimum:position"),
    ({**GOOD, "propensity": 1.5}, "maximum:propensity"),
    ({**GOOD, "value": True}, "type:value"),
    ({**GOOD, "value": "4"}, "type:value"),
    ({**GOOD, "context": {"device": "tv", "os": "x"}}, "unknown_field"),
    ({**GOOD, "context": {"device": 7}}, "type:context.device"),
    ({**GOOD, "context": {"country": "DEU"}}, "maxLength:context.country"),
    ({**GOOD, "context": "tv"}, "type:context"),
    ({**GOOD, "colour": "red"}, "unknown_field"),
    ({**GOOD, "user_id": None, "colour": "red"}, "unknown_field"),  # top level sorts first
    (_without("event_id"), "required:event_id"),
    (_without("item_id", "user_id"), "required:user_id"),  # schema order of required
    (_without("ts"), "required:ts"),
    ({**GOOD, "ts": REF_MS + MAX_CLOCK_SKEW_MS + 1}, "future_ts"),
    ({**GOOD, "ts": REF_MS + MAX_CLOCK_SKEW_MS}, None),
    ([1, 2], "type:record"),
    ("5", "type:record"),
    ('{"event_id": "e1", ', "malformed_json"),
    ("not json", "malformed_json"),
    ('{"event_id": "a", "event_id": "b"}', "malformed_json"),
    (json.dumps({**GOOD, "value": float("nan")}), "malformed_json"),
    (b'{"event_id": "\xff\xfe", "user_id": "u"}', "invalid_utf8"),
    (json.dumps({**GOOD, "session_id": "s" * 70_000}), "oversized_record"),
]


def _line(case: object) -> bytes:
    if isinstance(case, bytes):
        return case
    return (case if isinstance(case, str) else json.dumps(case)).encode()


def python_line_reason(line: bytes, reference_ms: int) -> str | None:
    """The Python reference for a raw line: strict JSON, then ``tandem.validation``."""
    from tandem.spark.validate import MAX_RECORD_BYTES

    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    if len(line) > MAX_RECORD_BYTES:
        return "oversized_record"

    def no_duplicates(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_constants(name):
        raise ValueError(name)

    try:
        record = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except ValueError:
        return "malformed_json"
    try:
        validate_event(record, reference_ms)
    except ContractError as err:
        return err.reason
    return None


def spark_line_reasons(spark, lines: list[bytes], reference_ms: int) -> list[str | None]:
    """Run the Spark expressions over lines written to a file and read back as text."""
    import tempfile
    from pathlib import Path

    from pyspark.sql import functions as F

    from tandem.spark.validate import with_reason

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lines.jsonl"
        path.write_bytes(b"".join(f"{i}\t".encode() + ln + b"\n" for i, ln in enumerate(lines)))
        df = spark.read.text(str(path))
        parts = F.split("value", "\t", 2)
        df = df.select(parts[0].cast("int").alias("i"), parts[1].alias("line"))
        rows = with_reason(df, "line", F.lit(reference_ms)).orderBy("i").collect()
    return [r.reason for r in rows]


def test_python_reference_matches_expected():
    got = [python_line_reason(_line(c), REF_MS) for c, _ in CASES]
    assert got == [want for _, want in CASES]


def test_spark_reasons_equal_python_reasons(spark):
    lines = [_line(c) for c, _ in CASES]
    assert spark_line_reasons(spark, lines, REF_MS) == [
        python_line_reason(ln, REF_MS) for ln in lines]


def test_flat_columns_of_a_valid_event(spark):
    from pyspark.sql import functions as F

    from tandem.spark.validate import lake_event_schema, with_reason

    df = spark.createDataFrame([(json.dumps({**GOOD, "ts": 1.7e12}),)], "line string")
    judged = with_reason(df, "line", F.lit(2_000_000_000_000))
    row = judged.select(*[f.name for f in lake_event_schema()]).first().asDict()
    assert [f.name for f in lake_event_schema()] == list(row)
    assert row["ts"] == 1_700_000_000_000
    assert row["ctx_country"] == "DE" and row["position"] == 3 and row["propensity"] == 0.25
    assert row["dwell_ms"] is None


def test_spark_reasons_equal_python_reasons_on_every_mutant(spark):
    """Every field at every JSON type and bound: the fast path accepts none of the bad records."""
    from tests.test_validation_fast import _mutants

    lines = [json.dumps(m).encode() for m in _mutants("event")]
    got = spark_line_reasons(spark, lines, REF_MS)
    assert got == [python_line_reason(ln, REF_MS) for ln in lines]
    assert len(got) > 800 and 50 < got.count(None) < len(got) - 500  # accepts and rejects


def test_fast_path_takes_the_usual_spellings_only(spark):
    """The common valid spellings skip the per-field checks; rare ones (1e3) take them."""
    from pyspark.sql import functions as F

    from tandem.spark.validate import _fast_accepts, _nodes, _typed_record, parse
    from tandem.validation import load_schema

    schema = load_schema("event")
    usual = [GOOD, CASES[1][0], {**GOOD, "context": None, "position": None, "propensity": 1},
             {**GOOD, "context": {}}, _without("context", "value", "session_id")]
    rare = [{**GOOD, "ts": 1.7e12}, {**GOOD, "position": 3.0}]
    df = spark.createDataFrame([(json.dumps(r),) for r in usual + rare], "line string")
    v = parse(F.col("line"))
    fast = _fast_accepts(schema, _nodes(schema), F.schema_of_variant(v),
                         F.try_variant_get(v, "$", _typed_record(schema).simpleString()))
    assert [r[0] for r in df.select(fast).collect()] == [True] * len(usual) + [False] * len(rare)
