"""Validate records against the versioned JSON Schemas in ``schemas/`` (the single source of truth).

The Kafka producer and consumers and serving's impression log call :func:`validate_event`; the
Spark ingestion job derives column expressions from the same schema (``tandem.spark.validate``),
and a test checks both agree on the same good and bad records.

Two validators, one schema: the schema compiled to Python code by ``fastjsonschema`` (~4 us per
event) decides accept/reject on the hot path, and ``jsonschema``'s reference validator (~160 us)
runs only on what that rejects, to name the reason, and has the last word. So rejects and their
reasons are exactly the reference's, and a test checks that both accept the same records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator

from tandem.config import REPO_ROOT

SCHEMAS_DIR = REPO_ROOT / "schemas"
# Events may be stamped by a client clock slightly ahead of ours; beyond this they are "future".
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000


@cache
def load_schema(name: str, version: int = 1) -> dict[str, Any]:
    """The JSON Schema ``schemas/<name>.v<version>.schema.json`` as a dict."""
    return json.loads((SCHEMAS_DIR / f"{name}.v{version}.schema.json").read_text())


@cache
def _validator(name: str, version: int) -> Draft202012Validator:
    return Draft202012Validator(load_schema(name, version))


@cache
def _fast_validator(name: str, version: int) -> Callable[[Any], Any]:
    """The schema as generated Python code; raises ``JsonSchemaException`` on a violation."""
    return fastjsonschema.compile(load_schema(name, version))


class ContractError(ValueError):
    """A record violates its contract; ``reason`` is short and machine-groupable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _reason(err: Any) -> str:
    """``<check>:<field>``: ``required:user_id``, ``enum:event_type``, ``maxLength:item_id``."""
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else "?"
        return f"required:{missing}"
    if err.validator == "additionalProperties":
        return "unknown_field"
    field = ".".join(str(p) for p in err.absolute_path) or "record"
    return f"{err.validator}:{field}"


def validate(record: Any, name: str, version: int = 1) -> None:
    """Raise :class:`ContractError` with the first violation (deterministic order)."""
    if not isinstance(record, dict):
        raise ContractError("type:record", f"expected an object, got {type(record).__name__}")
    try:
        _fast_validator(name, version)(record)
        return
    except fastjsonschema.JsonSchemaException:
        pass  # the reference validator below names the violation (or, if it finds none, accepts)
    errors = sorted(_validator(name, version).iter_errors(record), key=lambda e: (
        list(map(str, e.absolute_path)), e.validator))
    if errors:
        raise ContractError(_reason(errors[0]), errors[0].message)


def validate_event(event: Any, reference_ms: int | None = None) -> None:
    """Validate an event; with ``reference_ms``, also reject events from the future.

    Parameters
    ----------
    event : dict parsed from JSON
    reference_ms : the time the event is judged at (now for producers, the interval end for jobs).
    """
    validate(event, "event")
    if reference_ms is not None and event["ts"] > reference_ms + MAX_CLOCK_SKEW_MS:
        raise ContractError("future_ts", f"ts {event['ts']} > reference {reference_ms}")


def is_valid_event(event: Any, reference_ms: int | None = None) -> bool:
    try:
        validate_event(event, reference_ms)
    except ContractError:
        return False
    return True
