"""The compiled fast validator accepts exactly what the reference (jsonschema) validator accepts.

``tandem.validation.validate`` trusts the fast validator's accepts, so one that is too lax would
let a bad record through. Each schema's valid sample is mutated field by field with values of
every JSON type and at every bound, and both validators must agree on each mutant; rejects must
carry the reference's reason.
"""

from __future__ import annotations

import math

import fastjsonschema
import pytest

from tandem.validation import (
    ContractError,
    _fast_validator,
    _reason,
    _validator,
    load_schema,
    validate,
)

SAMPLES = {
    "event": {"event_id": "e1", "event_type": "click", "user_id": "u1", "item_id": "i1",
              "ts": 1_700_000_000_000, "session_id": "s1", "request_id": "r1", "position": 3,
              "dwell_ms": 1200, "value": 4.0,
              "context": {"device": "tv", "country": "DE", "surface": "home"},
              "experiment": "exp1", "variant": "B", "model_version": "7", "propensity": 0.25},
    "item": {"item_id": "1", "title": "Toy Story (1995)", "genres": ["Animation"],
             "release_year": 1995, "created_at": 0},
    "user": {"user_id": "1", "signup_ts": 0, "age_bucket": "25-34", "gender": "F"},
}
POOL = (None, True, False, 0, -1, 1, 1.0, 1.5, -0.5, 2, 10, 10.5, 255, 10_000, 10_001,
        86_400_000, 86_400_001, 32_503_680_000_000, 32_503_680_000_001, 2**70, 1e300,
        math.nan, math.inf, -math.inf, "", "x", "1", "x" * 2, "x" * 3, "x" * 32, "x" * 33,
        "x" * 64, "x" * 65, "é" * 64, "é" * 65, "tv", "click", "impression", "Animation",
        "25-34", "F", [], ["Animation"], ["Animation", 1], [None], {}, {"device": "tv"},
        {"os": "x"}, {"device": 1})


def _reference_reason(record: dict, name: str) -> str | None:
    """What the jsonschema validator alone says (None: valid)."""
    errors = sorted(_validator(name, 1).iter_errors(record),
                    key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    return _reason(errors[0]) if errors else None


def _validate_reason(record: dict, name: str) -> str | None:
    try:
        validate(record, name)
    except ContractError as err:
        return err.reason
    return None


def _fast_accepts(record: dict, name: str) -> bool:
    try:
        _fast_validator(name, 1)(record)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def _mutants(name: str):
    sample = SAMPLES[name]
    schema = load_schema(name)
    yield sample
    yield {**sample, "unknown_field": 1}
    for key in schema["required"]:
        yield {k: v for k, v in sample.items() if k != key}
    for key, spec in schema["properties"].items():
        for value in POOL:
            yield {**sample, key: value}
        for sub in spec.get("properties", {}):
            for value in POOL:
                yield {**sample, key: {**(sample.get(key) or {}), sub: value}}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_fast_and_reference_validators_agree(name):
    checked = 0
    for record in _mutants(name):
        reason = _reference_reason(record, name)
        assert _fast_accepts(record, name) == (reason is None), record
        assert _validate_reason(record, name) == reason, record
        checked += 1
    assert checked > 200  # every mutant was compared
