"""The OpenAI wire format both ways, the gateway's stream pieces and the batch file parser."""

from __future__ import annotations

import json

import pytest

from schemas import ErrorInfo, InferenceResult, Priority, Status, StreamDelta
from services.cli import batch
from services.gateway.app import _Pieces
from services.gateway.keys import KeyRing, digest
from shared import openai_format as oa
from shared.errors import ConfigError

WHO = {"tenant": "acme", "route": "chat", "reply_to": "gateway"}


def test_a_chat_body_becomes_a_request():
    request = oa.chat_request({
        "model": "chat", "max_completion_tokens": 12, "temperature": 0.2, "stop": "END", "seed": 3,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    }, priority=Priority.interactive, **WHO)
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "hi there")]
    assert request.sampling.max_tokens == 12 and request.sampling.stop == ["END"] and request.sampling.seed == 3
    assert request.response_schema == {"type": "object"} and request.priority == Priority.interactive


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format"),
])
def test_what_cannot_run_is_refused_with_its_parameter_named(body, param):
    with pytest.raises(oa.BadRequest) as caught:
        oa.chat_request(body, **WHO)
    assert caught.value.param == param


def test_a_completion_body_takes_one_prompt():
    assert oa.completion_request({"prompt": ["once"], "max_tokens": 5}, **WHO).prompt == "once"
    with pytest.raises(oa.BadRequest) as caught:
        oa.completion_request({"prompt": ["a", "b"]}, **WHO)
    assert caught.value.param == "prompt"


def result(**fields) -> InferenceResult:
    return InferenceResult(**{"request_id": "r1", "tenant": "acme", "route": "chat", "status": Status.ok,
                              "model": "small", "output": "hello world", "tokens_in": 3, "tokens_out": 2, **fields})


@pytest.mark.parametrize("status, code, retry, http", [
    (Status.rejected, "rate_limited", 1500, 429),
    (Status.rejected, "input_too_large", None, 400),
    (Status.rejected, "unknown_route", None, 404),
    (Status.expired, "deadline_passed", None, 504),
    (Status.failed, "engine_error", None, 502),
    (Status.rejected, "something_new", None, 400),
])
def test_results_that_are_not_ok_map_to_http_errors(status, code, retry, http):
    answer = result(status=status, error=ErrorInfo(code=code, message="why", retry_after_ms=retry))
    got, body, headers = oa.error_status(answer)
    assert got == http and body["error"]["code"] == code and body["error"]["message"] == "why"
    assert headers == ({"Retry-After": "2"} if retry else {})


def test_a_retriable_failure_is_503():
    answer = result(status=Status.failed, error=ErrorInfo(code="engine_error", message="x", retriable=True))
    assert oa.error_status(answer)[0] == 503


def delta(seq: int, text: str, attempt: int = 0, model: str = "small") -> StreamDelta:
    return StreamDelta(request_id="r1", seq=seq, text=text, attempt=attempt, model=model)


def texts(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_stream_pieces_make_the_answer_and_end_with_finish_and_usage():
    pieces = _Pieces("r1", 0, oa.CHAT, include_usage=True)
    chunks = pieces.take(delta(0, "hello")) + pieces.take(delta(1, " wor")) + pieces.take(result())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert texts(chunks) == "hello world"  # the last piece comes from the result
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_a_later_attempt_before_any_text_simply_streams():
    pieces = _Pieces("r1", 0, oa.CHAT, include_usage=False)
    chunks = pieces.take(delta(0, "", attempt=0)) + pieces.take(delta(0, "hello world", attempt=1, model="big"))
    chunks += pieces.take(result(model="big"))
    assert texts(chunks) == "hello world" and chunks[-1]["model"] == "big"


def test_a_later_attempt_after_text_went_out_ends_in_an_error_not_a_mixed_answer():
    pieces = _Pieces("r1", 0, oa.CHAT, include_usage=False)
    chunks = pieces.take(delta(0, "bonjour")) + pieces.take(delta(0, "hello", attempt=1, model="big"))
    assert texts(chunks) == "bonjour"
    end = pieces.take(result(model="big"))
    assert end[-1]["error"]["code"] == "stream_restarted"


def test_completion_pieces_carry_text():
    pieces = _Pieces("r1", 0, oa.COMPLETIONS, include_usage=False)
    chunks = pieces.take(delta(0, "hello")) + pieces.take(result())
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hello world"
    assert chunks[0]["object"] == "text_completion"


def test_keys_are_checked_by_their_digest(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f'keys: [{{name: a, sha256: "{digest("sk-a")}", tenant: acme, routes: [chat]}}]')
    ring = KeyRing.load(path)
    assert ring.authenticate("Bearer sk-a").tenant == "acme"
    assert ring.authenticate("Bearer sk-b") is None and ring.authenticate("sk-a") is None
    assert ring.authenticate(None) is None
    assert ring.keys[0].may_use("chat") and not ring.keys[0].may_use("faq")
    path.write_text('keys: [{name: a, sha256: "not-hex", tenant: acme}]')
    with pytest.raises(ConfigError, match="keys.0.sha256"):
        KeyRing.load(path)


def test_a_batch_file_gives_stable_requests_and_numbered_bad_lines():
    good = {"custom_id": "a", "method": "POST", "url": oa.CHAT, "body": {"messages": [{"role": "user", "content": "x"}]}}
    data = "\n".join([json.dumps(good), "", "[1]", json.dumps({**good, "custom_id": "a"}),
                      json.dumps({**good, "custom_id": "b", "body": {**good["body"], "stream": True}}),
                      json.dumps({**good, "custom_id": "c", "method": "GET"})]).encode()
    lines, bad, total = batch.parse(data, job="batch_x", route="chat", tenant="t", created_ms=1_700_000_000_000)
    again, _, _ = batch.parse(data, job="batch_x", route="chat", tenant="t", created_ms=1_700_000_000_000)
    assert total == 5 and [line.number for line in lines] == [1]
    assert lines[0].request.id == "batch_x.1" and lines[0].request.priority == Priority.batch
    assert lines[0].request == again[0].request  # a resumed run publishes the same bytes
    assert [(b.line, b.custom_id) for b in bad] == [(3, None), (4, "a"), (5, "b"), (6, "c")]
    assert "already used on line 1" in bad[1].error and "stream" in bad[2].error and "POST" in bad[3].error
    assert batch.job_id(data, "chat", "t") != batch.job_id(data, "chat", "u")
