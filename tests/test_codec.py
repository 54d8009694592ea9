"""decode_event turns any bytes into a valid event or a ContractError with a reason, never another
exception: a consumer relies on that to dead-letter a record and move on."""

from __future__ import annotations

import json

import pytest

from tandem.streaming.codec import decode_event, encode_event
from tandem.validation import ContractError

GOOD = {"event_id": "e1", "event_type": "click", "user_id": "u1", "item_id": "i1",
        "ts": 1_700_000_000_000, "value": 4.5}


def poison_records(max_bytes: int) -> dict[bytes, str]:
    """Records that broke or could break a consumer -> the reason each must be rejected with."""
    good = json.dumps(GOOD)
    return {
        b"[" * 50_000: "undecodable:depth",  # deep, yet under the size cap
        b'{"a":' * 5_000 + b"1" + b"}" * 5_000: "undecodable:depth",
        good.replace("4.5", "1e400").encode(): "undecodable:non_finite",
        good.replace("4.5", "NaN").encode(): "undecodable:non_finite",
        good.replace("1700000000000", "9" * 5000).encode(): "undecodable:number",
        good.replace('"e1"', '"\\ud800"').encode(): "undecodable:surrogate",
        b"\xff\xfe not utf-8": "undecodable:utf8",
        b"[1, 2]": "type:record",
        b'"just a string"': "type:record",
        json.dumps({**GOOD, "event_id": "x" * max_bytes}).encode(): "oversized",
    }


@pytest.mark.parametrize("value, reason", list(poison_records(64 * 1024).items()),
                         ids=lambda v: v[:24].decode("utf-8", "replace")
                         if isinstance(v, bytes) else v)
def test_poison_records_raise_contract_errors_with_reasons(value, reason):
    with pytest.raises(ContractError) as err:
        decode_event(value, max_bytes=64 * 1024)
    assert err.value.reason == reason


def test_good_records_still_decode_and_round_trip():
    escaped = json.dumps({**GOOD, "item_id": "caf\u00e9 \U0001f600"}).encode()  # \\u escapes
    assert decode_event(escaped)["item_id"] == "caf\u00e9 \U0001f600"
    assert decode_event(encode_event(GOOD)) == GOOD
    assert decode_event(encode_event(GOOD), max_bytes=len(encode_event(GOOD))) == GOOD
    with pytest.raises(ContractError, match="oversized"):
        decode_event(encode_event(GOOD), max_bytes=len(encode_event(GOOD)) - 1)


def test_future_ts_is_refused_against_a_reference_time():
    with pytest.raises(ContractError) as err:
        decode_event(encode_event(GOOD), reference_ms=GOOD["ts"] - 3_600_000)
    assert err.value.reason == "future_ts"
