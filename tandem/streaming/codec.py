"""The wire format of ``tandem.events.v1``: compact UTF-8 JSON, one event object per record.

Why JSON and not Avro: see :mod:`tandem.streaming.producer`. Both consumers decode through
:func:`decode_event`, so "undecodable" and "violates the contract" mean the same thing everywhere
and carry the same machine-groupable reasons as the Spark ingestion job's quarantine.

A record is untrusted input: whatever its bytes, :func:`decode_event` either returns a valid event
or raises :class:`ContractError` with a reason, never anything else. Without that, one record that
made ``json`` raise ``RecursionError`` (100,000 ``[``) or ``ValueError`` (an integer of 5,000
digits) stopped a consumer before its commit, and the restart read the same record again.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

from tandem.validation import ContractError, validate_event

# Events are well under 2 KB; anything far bigger is a bug or an attack, refused before parsing.
MAX_RECORD_BYTES = int(os.environ.get("TANDEM_MAX_RECORD_BYTES", 64 * 1024))


def now_ms() -> int:
    """Wall-clock epoch milliseconds (the unit of ``ts`` and of Kafka record timestamps)."""
    return time.time_ns() // 1_000_000


def encode_event(event: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; it has no newlines, so a value is also one landing-file line."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def _no_constant(name: str) -> float:
    """``NaN``/``Infinity`` are not JSON (RFC 8259); Python's parser accepts them by default."""
    raise ContractError("undecodable:non_finite", f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf, which no downstream reader expects
        raise ContractError("undecodable:non_finite", f"{text[:32]} overflows a double")
    return value


def _parse(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except ContractError:
        raise
    except json.JSONDecodeError as err:
        raise ContractError("undecodable:json", str(err)) from None
    except RecursionError:
        raise ContractError("undecodable:depth", "nested too deeply") from None
    except ValueError as err:  # e.g. an integer beyond sys.get_int_max_str_digits()
        raise ContractError("undecodable:number", str(err)[:200]) from None


def decode_event(value: bytes | None, reference_ms: int | None = None,
                 max_bytes: int = MAX_RECORD_BYTES,
                 validator: Callable[[Any, int | None], None] = validate_event
                 ) -> dict[str, Any]:
    """Parse and validate one record value (an event; ``validator`` checks another contract,
    e.g. ``tandem.features.feature_log.validate_record``).

    Raises ``ContractError`` and nothing else: reason ``oversized``, ``undecodable:utf8``,
    ``undecodable:json``, ``undecodable:depth``, ``undecodable:number``,
    ``undecodable:non_finite``, ``undecodable:surrogate`` or the contract check that failed
    (e.g. ``type:record``, ``required:user_id``, ``future_ts``).
    """
    if value is None:
        raise ContractError("undecodable:null", "record has no value")
    if len(value) > max_bytes:
        raise ContractError("oversized", f"{len(value)} bytes > {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ContractError("undecodable:utf8", str(err)) from None
    event = _parse(text)
    if "\\u" in text:  # a lone surrogate escape decodes to a str that cannot be encoded again
        try:
            encode_event(event)
        except UnicodeEncodeError:
            raise ContractError("undecodable:surrogate", "lone UTF-16 surrogate") from None
    try:
        validator(event, reference_ms)
    except ContractError:
        raise
    except Exception as err:  # noqa: BLE001 - a validator bug must not stop the stream either
        raise ContractError(f"invalid:{type(err).__name__}", str(err)[:200]) from None
    return event
