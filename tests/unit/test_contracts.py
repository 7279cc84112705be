"""The wire contract: round trips, validation that names the field, and checked-in JSON Schemas in sync."""

import orjson
from pydantic import ValidationError
import pytest

from schemas import (
    SCHEMA_VERSION,
    CostRecord,
    InferenceRequest,
    InferenceResult,
    ModelSpec,
    RoutedRequest,
    Status,
)
from schemas.export import JSON_DIR, rendered
from shared.codec import decode, encode
from shared.errors import UndecodableMessage


def chat_request(**overrides) -> InferenceRequest:
    fields = dict(tenant="acme", route="chat", reply_to="svc", messages=[{"role": "user", "content": "hi"}])
    fields.update(overrides)
    return InferenceRequest.model_validate(fields)


def test_request_round_trips_as_orjson_bytes_with_its_schema_version():
    request = chat_request(priority="interactive", sampling={"max_tokens": 12, "stop": ["\n"]})
    data = encode(request)
    assert orjson.loads(data)["schema_version"] == SCHEMA_VERSION
    assert decode(InferenceRequest, data) == request


def test_request_needs_exactly_one_of_messages_or_prompt():
    with pytest.raises(UndecodableMessage, match="exactly one of 'messages'"):
        decode(InferenceRequest, orjson.dumps({"tenant": "a", "route": "r", "reply_to": "s"}))
    with pytest.raises(UndecodableMessage, match="exactly one"):
        decode(InferenceRequest, orjson.dumps({"tenant": "a", "route": "r", "reply_to": "s", "prompt": "x",
                                               "messages": [{"role": "user", "content": "y"}]}))


def test_validation_error_names_the_field():
    bad = orjson.dumps({"tenant": "a", "route": "r", "reply_to": "s", "prompt": "x", "sampling": {"max_tokens": 0}})
    with pytest.raises(UndecodableMessage, match=r"sampling\.max_tokens"):
        decode(InferenceRequest, bad)


def test_unknown_fields_and_other_schema_versions_are_refused():
    base = {"tenant": "a", "route": "r", "reply_to": "s", "prompt": "x"}
    with pytest.raises(UndecodableMessage, match="tenat"):
        decode(InferenceRequest, orjson.dumps({**base, "tenat": "typo"}))
    with pytest.raises(UndecodableMessage, match="schema_version"):
        decode(InferenceRequest, orjson.dumps({**base, "schema_version": 99}))


def test_names_that_reach_topic_names_are_restricted():
    with pytest.raises(ValueError):
        chat_request(reply_to="../../etc")
    with pytest.raises(ValueError):
        chat_request(tenant="a" * 65)


def test_values_the_engine_or_the_books_would_choke_on_are_refused_up_front():
    with pytest.raises(ValueError, match="stop"):
        chat_request(sampling={"stop": [""]})
    with pytest.raises(ValueError, match="created_at_ms"):
        chat_request(created_at_ms=1_700_000_000)  # seconds, not milliseconds
    with pytest.raises(ValueError, match="latency_ms"):
        CostRecord(request_id="r", ts_ms=1, tenant="a", route="r", model="m", priority="standard",
                   status=Status.ok, tokens_in=1, tokens_out=1, cost_nano_usd=1, latency_ms=2**40)


def test_not_json_is_an_undecodable_message():
    with pytest.raises(UndecodableMessage, match="not valid JSON"):
        decode(InferenceRequest, b"\xff{not json")
    with pytest.raises(UndecodableMessage, match="empty"):
        decode(InferenceRequest, None)


def test_prices_are_exact_in_nano_usd():
    spec = ModelSpec(tier="small", price_in_usd_per_mtok="0.075", price_out_usd_per_mtok="0.3")
    assert spec.price.in_nano_usd_per_token == 75
    assert spec.price.cost_nano_usd(tokens_in=1_000_000, tokens_out=1_000_000) == 375_000_000  # $0.375
    with pytest.raises(ValueError, match="at most 3 decimals"):
        ModelSpec(tier="small", price_in_usd_per_mtok="0.0001", price_out_usd_per_mtok="1")


def test_result_and_cost_record_round_trip():
    result = InferenceResult(request_id="r1", tenant="acme", route="chat", status=Status.ok, output="hello",
                             model="small", tokens_in=5, tokens_out=2)
    assert decode(InferenceResult, encode(result)) == result
    cost = CostRecord(request_id="r1", ts_ms=1, tenant="acme", route="chat", model="small", priority="standard",
                      status=Status.ok, tokens_in=5, tokens_out=2, cost_nano_usd=10, latency_ms=3)
    assert decode(CostRecord, encode(cost)) == cost
    assert "output" not in CostRecord.model_fields and "prompt" not in CostRecord.model_fields


def test_routed_request_carries_the_request_intact():
    request = chat_request()
    routed = RoutedRequest(request=request, model="small", price={"in_nano_usd_per_token": 1, "out_nano_usd_per_token": 2},
                           policy_version="v1", received_at_ms=5)
    assert decode(RoutedRequest, encode(routed)).request == request


def test_checked_in_json_schemas_match_the_models():
    expected = rendered()
    on_disk = {p.name: p.read_text() for p in JSON_DIR.glob("*.schema.json")}
    assert set(on_disk) == set(expected), "schema files differ from schemas.EXPORTED; run python -m schemas.export"
    for name, text in expected.items():
        assert on_disk[name] == text, f"{name} drifted from its model; run python -m schemas.export"


def test_replaced_is_model_copy_with_update():
    from shared.codec import replaced

    request = InferenceRequest(tenant="acme", route="chat", reply_to="r", prompt="hi")
    fast = replaced(request, sampling=replaced(request.sampling, max_tokens=8))
    slow = request.model_copy(update={"sampling": request.sampling.model_copy(update={"max_tokens": 8})})
    assert fast == slow and fast.sampling.max_tokens == 8 and request.sampling.max_tokens != 8
    assert fast.model_fields_set == slow.model_fields_set and "sampling" in fast.model_fields_set
    assert encode(fast) == encode(slow)
    with pytest.raises(ValidationError):  # still frozen
        fast.route = "other"
