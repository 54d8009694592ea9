"""The JSON Schemas accept good records and name the reason for bad ones."""

import pytest

from tandem.validation import ContractError, validate, validate_event

GOOD = {"event_id": "e1", "event_type": "click", "user_id": "u1", "item_id": "i1",
        "ts": 1_700_000_000_000, "session_id": "s1", "request_id": "r1", "position": 3,
        "dwell_ms": None, "value": None, "context": {"device": "tv", "country": "DE",
                                                      "surface": "home"},
        "experiment": "exp1", "variant": "B", "model_version": "7", "propensity": 0.25}


def test_good_event_passes():
    validate_event(GOOD, reference_ms=GOOD["ts"])


@pytest.mark.parametrize("change, reason", [
    ({"event_type": "purchase"}, "enum:event_type"),
    ({"user_id": None}, "type:user_id"),
    ({"item_id": ""}, "minLength:item_id"),
    ({"ts": "1700000000000"}, "type:ts"),
    ({"ts": -5}, "minimum:ts"),
    ({"ts": 1.5}, "type:ts"),
    ({"item_id": "x" * 65}, "maxLength:item_id"),
    ({"position": -1}, "minimum:position"),
    ({"propensity": 1.5}, "maximum:propensity"),
    ({"context": {"device": "tv", "os": "x"}}, "unknown_field"),
    ({"colour": "red"}, "unknown_field"),
])
def test_bad_event_names_reason(change, reason):
    with pytest.raises(ContractError) as err:
        validate_event({**GOOD, **change})
    assert err.value.reason == reason


def test_missing_id_is_required_error():
    event = {k: v for k, v in GOOD.items() if k != "event_id"}
    with pytest.raises(ContractError) as err:
        validate_event(event)
    assert err.value.reason == "required:event_id"


def test_future_event_rejected_against_reference():
    with pytest.raises(ContractError) as err:
        validate_event(GOOD, reference_ms=GOOD["ts"] - 3_600_000)
    assert err.value.reason == "future_ts"


def test_item_and_user_contracts():
    validate({"item_id": "1", "title": "Toy Story (1995)", "genres": ["Animation"],
              "release_year": 1995, "created_at": 0}, "item")
    validate({"user_id": "1", "signup_ts": 0, "age_bucket": "25-34", "gender": "F"}, "user")
    with pytest.raises(ContractError):
        validate({"user_id": "1", "signup_ts": 0, "age_bucket": "30"}, "user")
