"""The wire format of ``tandem.events.v1``: compact UTF-8 JSON, one event object per record.

Why JSON and not Avro: see :mod:`tandem.streaming.producer`. Both consumers decode through
:func:`decode_event`, so "undecodable" and "violates the contract" mean the same thing everywhere
and carry the same machine-groupable reasons as the Spark ingestion job's quarantine.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tandem.validation import ContractError, validate_event


def now_ms() -> int:
    """Wall-clock epoch milliseconds (the unit of ``ts`` and of Kafka record timestamps)."""
    return time.time_ns() // 1_000_000


def encode_event(event: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; it has no newlines, so a value is also one landing-file line."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def decode_event(value: bytes | None, reference_ms: int | None = None) -> dict[str, Any]:
    """Parse and validate one record value.

    Raises ``ContractError`` with reason ``undecodable:utf8``, ``undecodable:json`` or the
    contract check that failed (e.g. ``required:user_id``, ``future_ts``).
    """
    if value is None:
        raise ContractError("undecodable:null", "record has no value")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ContractError("undecodable:utf8", str(err)) from None
    try:
        event = json.loads(text)
    except json.JSONDecodeError as err:
        raise ContractError("undecodable:json", str(err)) from None
    validate_event(event, reference_ms)
    return event
