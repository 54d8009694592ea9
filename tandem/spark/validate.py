"""Spark column expressions that validate raw event lines, derived from ``schemas/event.v1``.

The checks are generated from the JSON Schema (``tandem.validation.load_schema``), so the Spark
ingestion job and the Python validator (producers, consumers, serving) enforce one contract and
name violations with the SAME reason strings: ``<check>:<field path>`` (``required:user_id``,
``type:ts``, ``enum:event_type``, ``maxLength:item_id``, ``minimum:ts``, ``type:context.device``,
``type:record``), ``unknown_field`` and ``future_ts``. Lines get three more reasons the Python
validator never sees because it receives parsed dicts: ``invalid_utf8``, ``oversized_record`` and
``malformed_json``.

How a line is judged (the first failing check wins, in this precedence):

1. ``invalid_utf8``: the text reader replaced undecodable bytes with U+FFFD. A *literal* U+FFFD
   written as raw UTF-8 is flagged too; producers escape non-ASCII (``json.dumps`` default), so
   real events carry ``\\ufffd`` as an escape, which is not flagged.
2. ``oversized_record``: more than :data:`MAX_RECORD_BYTES` bytes of UTF-8.
3. ``malformed_json``: not strict RFC 8259 JSON (``try_parse_json`` is null). That includes
   ``NaN``/``Infinity`` and duplicate keys, which Python's ``json.loads`` would accept.
4. Schema violations, ordered exactly as ``tandem.validation.validate`` orders them: by field path
   (as a list of strings), then check name; missing required fields in the schema's order.
5. ``future_ts``: ``ts > reference_ms + MAX_CLOCK_SKEW_MS``.

JSON types come from the parsed VARIANT (``schema_of_variant``), never from casting, so a string
``"1700000000000"``, a float ``1.5`` or a boolean for ``ts`` is a type error, while ``1.0`` or
``1e3`` is an integer, as in JSON Schema 2020-12 (and jsonschema).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import DataType, DoubleType, LongType, StringType, StructField, StructType

from tandem import schema as s
from tandem.validation import MAX_CLOCK_SKEW_MS, load_schema

MAX_RECORD_BYTES = 64 * 1024
INVALID_UTF8 = "invalid_utf8"
OVERSIZED_RECORD = "oversized_record"
MALFORMED_JSON = "malformed_json"
FUTURE_TS = "future_ts"
UNKNOWN_FIELD = "unknown_field"
# Nested objects are flattened into the lake with a prefix (context.device -> ctx_device).
FLAT_PREFIX = {s.CONTEXT: "ctx_"}
_REPLACEMENT_CHAR = "\ufffd"
_SPARK_TYPE = {"string": StringType(), "integer": LongType(), "number": DoubleType()}
_NUMERIC = ("BIGINT", "DOUBLE", "DECIMAL")
_NUMBER_CHECKS = {"minimum", "maximum"}
_STRING_CHECKS = {"enum", "minLength", "maxLength"}
PARSED = "_event"  # the parsed line (VARIANT) that with_reason adds


@dataclass(frozen=True)
class _Check:
    """One possible violation: where (path), which check, and the condition that fails it."""

    path: tuple[str, ...]
    check: str
    failed: Column
    reason: str

    @property
    def order(self) -> tuple[list[str], str]:
        """The sort key ``tandem.validation.validate`` uses (field path, then check name)."""
        return list(self.path), self.check


def _nodes(node: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Every schema node with its field path, depth first (the root has path ``()``)."""
    out = [(path, node)]
    for name, child in node.get("properties", {}).items():
        if not name.isidentifier():
            raise ValueError(f"field name {name!r} is not a simple identifier")
        out += _nodes(child, (*path, name))
    return out


def _helper(kind: str, path: tuple[str, ...]) -> str:
    return "__".join(("", "v", kind, *path))


class _Json:
    """JSON-type predicates on the helper columns of one node (kind, number, string, keys).

    ``kind`` is ``schema_of_variant`` of the value: null when the field is absent, else
    ``BIGINT``, ``DECIMAL(p,s)``, ``DOUBLE``, ``STRING``, ``BOOLEAN``, ``VOID`` (JSON null),
    ``OBJECT<...>`` (``OBJECT`` where the schema expects an object) or ``ARRAY<...>``.
    """

    def __init__(self, path: tuple[str, ...]) -> None:
        self.kind = F.col(_helper("kind", path))
        self.number = F.col(_helper("num", path))
        self.string = F.col(_helper("str", path))
        self.keys = F.col(_helper("keys", path))

    def is_(self, json_type: str) -> Column:
        if json_type == "string":
            return self.kind == "STRING"
        if json_type == "number":
            return self.is_number()
        if json_type == "integer":  # JSON Schema: any number with a zero fractional part
            return self.is_number() & ((self.number % 1) == 0)
        if json_type == "boolean":
            return self.kind == "BOOLEAN"
        if json_type == "null":
            return self.kind == "VOID"
        if json_type == "object":
            return self.kind.startswith("OBJECT")
        if json_type == "array":
            return self.kind.startswith("ARRAY")
        raise ValueError(f"unsupported JSON type {json_type!r}")

    def is_number(self) -> Column:
        return reduce(lambda a, b: a | b, [self.kind.startswith(k) for k in _NUMERIC])


def _helper_columns(value: Column, nodes: list[tuple[tuple[str, ...], dict]]) -> list[Column]:
    """Per node: its JSON kind, and its value as double / string / object keys where checked."""
    cols = []
    for path, node in nodes:
        sub = F.try_variant_get(value, ".".join(("$", *path)), "variant")
        kind = F.schema_of_variant(sub)
        types = node.get("type", [])
        if "integer" in types or _NUMBER_CHECKS & node.keys():  # only what a check reads
            cols.append(F.try_variant_get(sub, "$", "double").alias(_helper("num", path)))
        if _STRING_CHECKS & node.keys():
            cols.append(F.try_variant_get(sub, "$", "string").alias(_helper("str", path)))
        if "properties" in node:
            # an object's keys from the variant itself (not re-parsed from to_json), and its kind
            # without schema_of_variant's walk of every nested value: together ~4x cheaper than
            # those two on the record, which ingest judges for every line
            keys = F.map_keys(F.try_variant_get(sub, "$", "map<string,variant>"))
            cols.append(keys.alias(_helper("keys", path)))
            kind = F.when(keys.isNotNull(), F.lit("OBJECT")).otherwise(kind)
        cols.append(kind.alias(_helper("kind", path)))
    return cols


def _node_checks(path: tuple[str, ...], node: dict[str, Any]) -> list[_Check]:
    """Every check of schema ``node`` itself (children are separate nodes)."""
    field = ".".join(path) or "record"
    j = _Json(path)
    present = j.kind.isNotNull()
    checks = []
    types = node.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        ok = reduce(lambda a, b: a | b, [j.is_(t) for t in allowed])
        checks.append(_Check(path, "type", present & ~ok, f"type:{field}"))
    if "enum" in node:
        if not all(isinstance(v, str) for v in node["enum"]):
            raise ValueError(f"only string enums are supported ({field})")
        ok = j.is_("string") & j.string.isin(list(node["enum"]))
        checks.append(_Check(path, "enum", present & ~ok, f"enum:{field}"))
    for check, op in (("minLength", "lt"), ("maxLength", "gt")):
        if check in node:
            length = F.char_length(j.string)
            bad = length < node[check] if op == "lt" else length > node[check]
            checks.append(_Check(path, check, j.is_("string") & bad, f"{check}:{field}"))
    for check, op in (("minimum", "lt"), ("maximum", "gt")):
        if check in node:
            bad = j.number < node[check] if op == "lt" else j.number > node[check]
            checks.append(_Check(path, check, j.is_number() & bad, f"{check}:{field}"))
    if "properties" in node:
        is_object = j.is_("object")
        props = node["properties"]
        if node.get("additionalProperties") is False:
            unknown = F.size(F.array_except(j.keys, F.array(*[F.lit(p) for p in props]))) > 0
            checks.append(_Check(path, "additionalProperties", is_object & unknown,
                                 UNKNOWN_FIELD))
        checks += [_Check(path, "required", is_object & _Json((*path, name)).kind.isNull(),
                          f"required:{name}") for name in node.get("required", [])]
    return checks


def _schema_reason(nodes: list[tuple[tuple[str, ...], dict]]) -> Column:
    """First violation, ordered as ``tandem.validation.validate`` orders them (sorted once)."""
    checks = sorted((c for path, node in nodes for c in _node_checks(path, node)),
                    key=lambda c: c.order)
    return F.coalesce(*[F.when(F.coalesce(c.failed, F.lit(False)), F.lit(c.reason))
                        for c in checks])


def parse(line: Column) -> Column:
    """The line as a VARIANT; null when it is not strict JSON."""
    return F.try_parse_json(line)


def with_reason(df: DataFrame, line: str, reference_ms: Column, reason: str = s.REASON,
                parsed: str = PARSED, name: str = "event", version: int = 1) -> DataFrame:
    """Add ``parsed`` (the line as VARIANT) and ``reason`` (null when the line is valid).

    Parameters
    ----------
    df : any frame with a string column ``line`` (decoded text; bad bytes are U+FFFD).
    reference_ms : epoch ms each event is judged at (ingestion: the end of its landing hour).

    The per-field helper values are computed in their own projection first, so the reason
    expression only compares columns (one huge nested expression takes Spark ~40 s to compile).
    """
    nodes = _nodes(load_schema(name, version))
    out = df.withColumn(parsed, parse(F.col(line)))
    helpers = _helper_columns(F.col(parsed), nodes)
    out = out.select("*", *helpers)
    ts = F.try_variant_get(F.col(parsed), f"$.{s.TS}", "bigint")
    out = out.withColumn(reason, F.coalesce(
        F.when(F.instr(F.col(line), _REPLACEMENT_CHAR) > 0, F.lit(INVALID_UTF8)),
        F.when(F.octet_length(F.col(line)) > MAX_RECORD_BYTES, F.lit(OVERSIZED_RECORD)),
        F.when(F.col(parsed).isNull(), F.lit(MALFORMED_JSON)),
        _schema_reason(nodes),
        F.when(ts > reference_ms + F.lit(MAX_CLOCK_SKEW_MS), F.lit(FUTURE_TS)),
    ))
    return out.drop(*[h for h in out.columns if h.startswith("__v__")])


def _spark_type(node: dict[str, Any]) -> DataType:
    types = node["type"] if isinstance(node["type"], list) else [node["type"]]
    (json_type,) = [t for t in types if t != "null"]
    return _SPARK_TYPE[json_type]


def _flat_fields(name: str = "event", version: int = 1) -> list[tuple[str, str, DataType]]:
    """(lake column, JSON path, Spark type) per leaf field, nested objects flattened."""
    out = []
    for field, node in load_schema(name, version)["properties"].items():
        if field in FLAT_PREFIX:
            out += [(FLAT_PREFIX[field] + sub, f"$.{field}.{sub}", _spark_type(child))
                    for sub, child in node["properties"].items()]
        else:
            out.append((field, f"$.{field}", _spark_type(node)))
    return out


def lake_event_schema() -> StructType:
    """Flat lake columns of an event (no partitions): integer -> long, number -> double."""
    return StructType([StructField(c, t) for c, _, t in _flat_fields()])


def flat_event_columns(value: Column) -> list[Column]:
    """The lake columns of a parsed, VALID event (VARIANT), in :func:`lake_event_schema` order."""
    return [F.try_variant_get(value, path, t.simpleString()).alias(c)
            for c, path, t in _flat_fields()]
