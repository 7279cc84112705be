"""Fuzzing the codec with hypothesis: whatever bytes arrive, decode either returns a valid
InferenceRequest or raises UndecodableMessage with a one-line reason, never anything else; and
whatever it accepts, encode can write back (the router re-encodes every request it forwards).

The strategies here are also the integration fuzz test's generators (tests/integration/test_fuzz_router.py).
"""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas import InferenceRequest
from schemas.request import EARLIEST_MS, LATEST_MS, MAX_TEXT_CHARS
from shared.codec import decode, encode
from shared.errors import UndecodableMessage

# Deterministic and without an example database: a failure here fails on every run, and no
# .hypothesis/ folder is left in the checkout.
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FIELDS = set(InferenceRequest.model_fields)
REQUIRED = ("tenant", "route", "reply_to")
INT64_MAX = 2**63 - 1
PLACEHOLDER = "__DEEP__"

# Names as the contract allows them (NAME_PATTERN without the '$' that Python also lets match before a '\n').
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
short_text = st.text(max_size=40)

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
# JSON values orjson can write: what a producer in another language could send.
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)

# Numbers and number-like values nobody should get away with as sampling parameters, and some
# that are fine: the property is about how decode fails, not whether.
absurd_numbers = st.sampled_from([
    -1, 0, -0.0, -1e-9, 1e-320, 1, 2.0000001, 131_073, 2**31, 2**53 + 1, INT64_MAX, 2**64 - 1, 1e308, -1e308,
    "NaN", "nan", "-nan", "inf", "-inf", "Infinity", "1e999", "-1e999", "1e400", "", " ", "abc", "0x10", "1_000",
    " 1 ", "½", "١", None, True, False, [], {}, [1], {"value": 1},
]) | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def sampling_params(draw) -> dict:
    out = {}
    if draw(st.booleans()):
        out["max_tokens"] = draw(st.integers(1, 131_072))
    if draw(st.booleans()):
        out["temperature"] = draw(st.floats(0.0, 2.0))
    if draw(st.booleans()):
        out["top_p"] = draw(st.floats(0.0, 1.0, exclude_min=True))
    if draw(st.booleans()):
        out["stop"] = draw(st.lists(st.text(min_size=1, max_size=8), max_size=3))
    if draw(st.booleans()):
        out["seed"] = draw(st.integers(-(2**63), INT64_MAX))
    return out


@st.composite
def valid_requests(draw, *, ids=st.text(min_size=1, max_size=128), reply_to=names) -> dict:
    """A request dict the contract accepts, with a random choice of its optional fields."""
    req = {"tenant": draw(names), "route": draw(names), "reply_to": draw(reply_to)}
    if draw(st.booleans()):
        req["messages"] = draw(st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": short_text}),
            min_size=1, max_size=3))
    else:
        req["prompt"] = draw(short_text)
    optional = {
        "schema_version": st.just(1),
        "id": ids,
        "priority": st.sampled_from(["interactive", "standard", "batch"]),
        "sampling": sampling_params(),
        "response_schema": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "tools": st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=3), max_size=2),
        "escalate": st.booleans(),
        "deadline_unix_ms": st.integers(0, LATEST_MS),
        "max_cost_nano_usd": st.integers(0, INT64_MAX),
        "idempotency_key": st.text(max_size=40),
        "prefix_key": st.text(max_size=40),
        "created_at_ms": st.integers(EARLIEST_MS, LATEST_MS),
    }
    for field, values in optional.items():
        if field == "id" or draw(st.booleans()):
            req[field] = draw(values)
    return req


def _dumps(value, draw) -> bytes:
    """JSON text the way some producer might write it: stdlib json also writes NaN, Infinity and
    integers of any size, which orjson never does."""
    return json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True).encode()


def _with_deep(value, draw, depth: int) -> bytes:
    """`value` as JSON with the string PLACEHOLDER replaced by `depth` levels of nesting."""
    opener, closer = draw(st.sampled_from([('{"a":', "}"), ("[", "]")]))
    deep = opener * depth + "1" + closer * depth
    return json.dumps(value).replace(json.dumps(PLACEHOLDER), deep, 1).encode()


@st.composite
def near_valid(draw, base=None) -> bytes:
    """A valid request with one mutation: a field dropped, an unknown field, an absurd sampling value,
    a wrong type, an overlong string, deep nesting, a number too big for 64 bits, broken bytes."""
    req = draw(base if base is not None else valid_requests())
    kind = draw(st.sampled_from([
        "drop", "unknown_field", "sampling", "sampling_not_a_dict", "wrong_type", "long_string",
        "deep", "big_int", "inputs", "messages", "schema_version", "truncate", "flip_byte",
    ]))
    if kind == "drop":
        field = draw(st.sampled_from([*REQUIRED, "messages" if "messages" in req else "prompt"]))
        del req[field]
    elif kind == "unknown_field":
        key = draw(st.text(max_size=20) | st.sampled_from(["x\ny", "\r\n", "Tenant", "sampling ", "id\u2028"]))
        if key in FIELDS:
            key += "_"
        req[key] = draw(json_values)
    elif kind == "sampling":
        sampling = dict(req.get("sampling", {}))
        sampling[draw(st.sampled_from(["max_tokens", "temperature", "top_p", "seed", "stop"]))] = draw(absurd_numbers)
        if draw(st.booleans()):
            sampling[draw(st.text(max_size=10).filter(lambda k: k not in {"max_tokens", "temperature", "top_p",
                                                                          "seed", "stop"}))] = draw(json_values)
        req["sampling"] = sampling
    elif kind == "sampling_not_a_dict":
        req["sampling"] = draw(json_scalars | st.lists(json_scalars, max_size=3))
    elif kind == "wrong_type":
        req[draw(st.sampled_from(sorted(FIELDS)))] = draw(json_values | absurd_numbers)
    elif kind == "long_string":
        field, limit = draw(st.sampled_from([("tenant", 64), ("route", 64), ("reply_to", 64), ("id", 128),
                                             ("idempotency_key", 256), ("prefix_key", 256),
                                             ("prompt", MAX_TEXT_CHARS), ("content", MAX_TEXT_CHARS),
                                             ("stop", 256)]))
        # Over the limit by a little or, for the short fields, by a lot; in one- to four-byte characters.
        over = draw(st.sampled_from([1, 2] if limit == MAX_TEXT_CHARS else [1, 2, limit]))
        text = draw(st.sampled_from(["x", "é", "😀"])) * (limit + over)
        if field == "content":
            req.pop("prompt", None)
            req["messages"] = [{"role": "user", "content": text}]
        elif field == "stop":
            req["sampling"] = {**req.get("sampling", {}), "stop": [text]}
        else:
            req[field] = text
    elif kind == "deep":
        where = draw(st.sampled_from(["response_schema", "tools", "unknown", "sampling", "prompt"]))
        req["unexpected" if where == "unknown" else where] = (
            {"a": PLACEHOLDER} if where == "response_schema" else [PLACEHOLDER] if where == "tools" else PLACEHOLDER)
        return _with_deep(req, draw, draw(st.integers(1, 1100) | st.sampled_from([253, 254, 255, 256, 1023, 1024, 1025])))
    elif kind == "big_int":
        # Integers past 64 bits: as a JSON number, or as a string pydantic parses in lax mode.
        big = draw(st.integers(2**64, 10**40) | st.integers(-(10**40), -(2**63) - 1))
        value = big if draw(st.booleans()) else str(big)
        field = draw(st.sampled_from(["seed", "max_tokens", "deadline_unix_ms", "max_cost_nano_usd", "created_at_ms"]))
        if field in ("seed", "max_tokens"):
            req["sampling"] = {**req.get("sampling", {}), field: value}
        else:
            req[field] = value
    elif kind == "inputs":
        choice = draw(st.sampled_from(["both", "neither", "empty_messages", "null_prompt"]))
        req.pop("messages", None)
        req.pop("prompt", None)
        if choice == "both":
            req["prompt"], req["messages"] = "p", [{"role": "user", "content": "m"}]
        elif choice == "empty_messages":
            req["messages"] = []
        elif choice == "null_prompt":
            req["prompt"] = None
    elif kind == "messages":
        choice = draw(st.sampled_from(["bad_role", "no_content", "extra_key", "too_many", "not_a_list", "not_dicts"]))
        req.pop("prompt", None)
        req["messages"] = {
            "bad_role": [{"role": draw(st.text(max_size=10) | json_scalars), "content": "x"}],
            "no_content": [{"role": "user"}],
            "extra_key": [{"role": "user", "content": "x", "name": draw(json_values)}],
            "too_many": [{"role": "user", "content": "x"}] * 1025,
            "not_a_list": draw(json_scalars),
            "not_dicts": draw(st.lists(json_scalars, min_size=1, max_size=3)),
        }[choice]
    elif kind == "schema_version":
        req["schema_version"] = draw(st.sampled_from([0, 2, "1", 1.5, -1, None, [1]]))
    elif kind in ("truncate", "flip_byte"):
        data = _dumps(req, draw)
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            return data[:at]
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return _dumps(req, draw)


def decode_or_refuse(data: bytes | None) -> InferenceRequest | None:
    """Decode `data`; None if refused. Fails the test on any other exception or a poor reason."""
    try:
        request = decode(InferenceRequest, data)
    except UndecodableMessage as exc:
        reason = str(exc)
        assert reason.strip(), f"empty reason for {data[:200]!r}"
        # Reasons go into log lines, dead letters and replies: one line, whatever the input's keys hold.
        assert "\n" not in reason and "\r" not in reason, f"reason spans several lines: {reason[:300]!r}"
        return None
    assert isinstance(request, InferenceRequest)
    return request


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=512))
@example(b"")
@example(b"\xff\xfe\x00")
@example(b"null")
@example(b'{"tenant": "a"')
@example(b"[" * 2000)
def test_arbitrary_bytes_decode_or_are_refused_with_a_reason(data):
    decode_or_refuse(data)


def test_a_message_without_a_value_is_refused():
    assert decode_or_refuse(None) is None


@settings(FUZZ, max_examples=200)
@given(json_values, st.booleans())
@example({"tenant": "a", "route": "b", "reply_to": "c"}, True)
@example([{"tenant": "a", "route": "b", "reply_to": "c", "prompt": "p"}], False)
def test_arbitrary_json_values_decode_or_are_refused_with_a_reason(value, ascii_only):
    decode_or_refuse(json.dumps(value, ensure_ascii=ascii_only).encode())


@settings(FUZZ, max_examples=250)
@given(near_valid())
@example(orjson.dumps({"tenant": "a", "route": "chat", "reply_to": "x", "prompt": "hi", "bad\nkey": 1}))
def test_near_valid_requests_decode_or_are_refused_with_a_one_line_reason(data):
    decode_or_refuse(data)


@settings(FUZZ, max_examples=250)
@given(near_valid())
@example(b'{"tenant":"a","route":"chat","reply_to":"x","prompt":"hi","sampling":{"seed":"100000000000000000000000"}}')
@example(b'{"tenant":"a","route":"chat","reply_to":"x","prompt":"hi","created_at_ms":"100000000000000000000000"}')
@example(b'{"tenant":"a","route":"chat","reply_to":"x","prompt":"hi","response_schema":'
         + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}")
def test_whatever_decode_accepts_encode_writes_back(data):
    """The router re-encodes every request it accepts (forwarded, or booked when refused): an accepted
    request that encode cannot write stops it."""
    try:
        request = decode(InferenceRequest, data)
    except UndecodableMessage:
        return
    assert decode(InferenceRequest, encode(request)) == request


@settings(FUZZ, max_examples=100)
@given(valid_requests())
def test_valid_requests_are_accepted_and_round_trip(fields):
    data = orjson.dumps(fields)
    request = decode(InferenceRequest, data)
    assert request.tenant == fields["tenant"] and request.reply_to == fields["reply_to"]
    assert request.id == fields["id"]
    again = decode(InferenceRequest, encode(request))
    assert again == request
    assert encode(again) == encode(request)


@pytest.mark.parametrize("value", ["NaN", "nan", "inf", "-inf", "Infinity", "1e999", -1, -0.5, 2.5, 1e308])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_non_finite_and_out_of_range_sampling_floats_are_refused(field, value):
    """Pinned cases the fuzzers above also reach: pydantic parses 'NaN' strings in lax mode."""
    data = orjson.dumps({"tenant": "a", "route": "chat", "reply_to": "x", "prompt": "hi", "sampling": {field: value}})
    with pytest.raises(UndecodableMessage, match=f"sampling.{field}"):
        decode(InferenceRequest, data)
