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

Cost: ingest judges every line, and almost every line is valid. So a line is first judged on a
fast path: ONE ``schema_of_variant`` of the whole record, matched against a regular expression
generated from the schema (known keys in the variant's sorted order, required ones present,
each with a JSON kind the schema allows; integers only as ``BIGINT``), and the value checks
(enum, lengths, bounds) on ONE typed read of the record (``try_variant_get`` to a struct), the
same read that gives the lake columns. Only lines the fast path does not accept (invalid ones,
and rare valid spellings such as ``1e3`` for an integer) pay for the per-field kinds that name
the first violation. The fast path only ever accepts; the reason always comes from the full
checks, so reasons and their precedence are unchanged.
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
# with_reason's intermediate columns: the parsed line (VARIANT), its schema_of_variant, its typed
# read and the fast path's verdict
PARSED, _KINDS, _TYPED, _FAST = "__v__event", "__v__kinds", "__v__typed", "__v__fast"
# schema_of_variant's names of the JSON types the fast path accepts
_FAST_KIND = {"string": "STRING", "null": "VOID", "integer": "BIGINT",
              "number": r"(?:BIGINT|DOUBLE|DECIMAL\(\d+,\d+\))"}


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


def _helper_columns(value: Column, nodes: list[tuple[tuple[str, ...], dict]],
                    needed: Column) -> list[Column]:
    """Per node: its JSON kind, and its value as double / string / object keys where checked.

    Each is computed only where ``needed`` (lines the fast path did not accept), else null.
    """
    cols = []

    def add(helper: str, path: tuple[str, ...], col: Column) -> None:
        cols.append(F.when(needed, col).alias(_helper(helper, path)))

    for path, node in nodes:
        sub = F.try_variant_get(value, ".".join(("$", *path)), "variant")
        kind = F.schema_of_variant(sub)
        types = node.get("type", [])
        if "integer" in types or _NUMBER_CHECKS & node.keys():  # only what a check reads
            add("num", path, F.try_variant_get(sub, "$", "double"))
        if _STRING_CHECKS & node.keys():
            add("str", path, F.try_variant_get(sub, "$", "string"))
        if "properties" in node:
            # an object's keys from the variant itself (not re-parsed from to_json), and its kind
            # without schema_of_variant's walk of every nested value: together ~4x cheaper than
            # those two on the record
            keys = F.map_keys(F.try_variant_get(sub, "$", "map<string,variant>"))
            add("keys", path, keys)
            kind = F.when(keys.isNotNull(), F.lit("OBJECT")).otherwise(kind)
        add("kind", path, kind)
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


def _kind_pattern(node: dict[str, Any]) -> str:
    """Regex of the ``schema_of_variant`` strings of the values the fast path accepts for ``node``.

    A subset of what the schema allows (an enum only as a string, an integer only as ``BIGINT``,
    which always fits the typed read); anything else takes the full checks.
    """
    types = node.get("type")
    allowed = ["string"] if "enum" in node else [types] if isinstance(types, str) else types
    if not allowed:
        raise ValueError(f"a fast-path node needs a type: {node}")
    alternatives = []
    for json_type in allowed:
        if json_type == "object":
            alternatives.append(_object_pattern(node))
        elif json_type in _FAST_KIND:
            alternatives.append(_FAST_KIND[json_type])
        else:
            raise ValueError(f"JSON type {json_type!r} has no fast path")
    return "(?:" + "|".join(alternatives) + ")"


def _object_pattern(node: dict[str, Any]) -> str:
    """``OBJECT<k: KIND, ...>``: only known keys, required ones present, in the variant's order.

    ``schema_of_variant`` lists an object's keys sorted (the variant's field order) and quotes any
    key that is not a plain name in backticks, so a key cannot spell a forged listing.
    """
    if node.get("additionalProperties") is not False:
        raise ValueError("the fast path needs objects with additionalProperties: false")
    required = set(node.get("required", []))
    fields = []
    for name in sorted(node["properties"], key=lambda k: k.encode()):
        field = f"{name}: {_kind_pattern(node['properties'][name])}(?:, |(?=>))"
        fields.append(field if name in required else f"(?:{field})?")
    return "OBJECT<" + "".join(fields) + ">"


def _value_checks(node: dict[str, Any], value: Column) -> list[Column]:
    """Conditions that hold when the typed ``value`` passes ``node``'s own value checks.

    Null (absent or JSON null, which the kind pattern already judged) passes.
    """
    bounds = {"minLength": F.char_length(value) >= node.get("minLength", 0),
              "maxLength": F.char_length(value) <= node.get("maxLength", 0),
              "minimum": value >= node.get("minimum", 0),
              "maximum": value <= node.get("maximum", 0)}
    checks = [ok for check, ok in bounds.items() if check in node]
    if "enum" in node:
        checks.append(value.isin(list(node["enum"])))
    return [F.coalesce(ok, F.lit(True)) for ok in checks]


def _fast_accepts(schema: dict[str, Any], nodes: list[tuple[tuple[str, ...], dict]],
                  kinds: Column, typed: Column) -> Column:
    """True only for lines the full checks would pass (``future_ts`` aside); false otherwise.

    ``kinds`` is ``schema_of_variant`` of the record, ``typed`` its read as :func:`_typed_record`.
    """
    checks = [kinds.rlike(f"^{_kind_pattern(schema)}$")]
    for path, node in nodes:
        if path:
            checks += _value_checks(node, reduce(Column.getField, path, typed))
    return F.coalesce(reduce(lambda a, b: a & b, checks), F.lit(False))


def _typed_record(node: dict[str, Any]) -> DataType:
    """The record as a (nested) struct: integer -> long, number -> double, string -> string."""
    if "properties" in node:
        return StructType([StructField(name, _typed_record(child))
                           for name, child in node["properties"].items()])
    return _spark_type(node)


def parse(line: Column) -> Column:
    """The line as a VARIANT; null when it is not strict JSON."""
    return F.try_parse_json(line)


def with_reason(df: DataFrame, line: str, reference_ms: Column, reason: str = s.REASON,
                name: str = "event", version: int = 1) -> DataFrame:
    """Add ``reason`` (null when the line is valid) and the record's flat lake columns.

    Parameters
    ----------
    df : any frame with a string column ``line`` (decoded text; bad bytes are U+FFFD).
    reference_ms : epoch ms each event is judged at (ingestion: the end of its landing hour).

    The lake columns (:func:`lake_event_schema` for events) are meaningful only where ``reason``
    is null. The per-field helper values are computed in their own projection first, so the
    reason expression only compares columns (one huge nested expression takes Spark ~40 s to
    compile).
    """
    schema = load_schema(name, version)
    nodes = _nodes(schema)
    flat = _flat_fields(name, version)
    if clash := {c for c, _, _ in flat} & set(df.columns):
        raise ValueError(f"columns {sorted(clash)} would be overwritten by the lake columns")
    out = df.withColumn(PARSED, parse(F.col(line)))
    out = out.select("*", F.schema_of_variant(F.col(PARSED)).alias(_KINDS),
                     F.try_variant_get(F.col(PARSED), "$", _typed_record(schema).simpleString())
                     .alias(_TYPED))
    out = out.withColumn(_FAST, _fast_accepts(schema, nodes, F.col(_KINDS), F.col(_TYPED)))
    out = out.select("*", *_helper_columns(F.col(PARSED), nodes, ~F.col(_FAST)))
    out = out.withColumn(reason, F.coalesce(
        F.when(F.instr(F.col(line), _REPLACEMENT_CHAR) > 0, F.lit(INVALID_UTF8)),
        F.when(F.octet_length(F.col(line)) > MAX_RECORD_BYTES, F.lit(OVERSIZED_RECORD)),
        F.when(F.col(PARSED).isNull(), F.lit(MALFORMED_JSON)),
        F.when(~F.col(_FAST), _schema_reason(nodes)),
        F.when(F.col(_TYPED)[s.TS] > reference_ms + F.lit(MAX_CLOCK_SKEW_MS), F.lit(FUTURE_TS)),
    ))
    return out.select(*df.columns, reason, *_flat_columns(F.col(_TYPED), flat))


def _spark_type(node: dict[str, Any]) -> DataType:
    types = node["type"] if isinstance(node["type"], list) else [node["type"]]
    (json_type,) = [t for t in types if t != "null"]
    return _SPARK_TYPE[json_type]


def _flat_fields(name: str = "event",
                 version: int = 1) -> list[tuple[str, tuple[str, ...], DataType]]:
    """(lake column, field path, Spark type) per leaf field, nested objects flattened."""
    out = []
    for field, node in load_schema(name, version)["properties"].items():
        if field in FLAT_PREFIX:
            out += [(FLAT_PREFIX[field] + sub, (field, sub), _spark_type(child))
                    for sub, child in node["properties"].items()]
        else:
            out.append((field, (field,), _spark_type(node)))
    return out


def _flat_columns(typed: Column, flat: list[tuple[str, tuple[str, ...], DataType]]) -> list[Column]:
    return [reduce(Column.getField, path, typed).alias(c) for c, path, _ in flat]


def lake_event_schema() -> StructType:
    """Flat lake columns of an event (no partitions): integer -> long, number -> double."""
    return StructType([StructField(c, t) for c, _, t in _flat_fields()])
