"""ProviderBackend against a small local HTTP server that answers as OpenAI or Anthropic would, and
fails as they do: the normalised Completion, each error's type and code, deadlines, streaming, keys."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from http.server import BaseHTTPRequestHandler

import orjson
import pytest

from schemas.policy import ProviderSpec
from schemas.request import InferenceRequest
from services.worker.provider import ERROR_EXCERPT_CHARS, ProviderBackend
from shared.errors import ConfigError, InputTooLarge, ProviderRejected, ProviderUnavailable
from tests.http_fakes import serving

KEY = "sk-test-4f9c2e7a1b8d6053-do-not-leak"
KEY_ENV = "SWITCHYARD_TEST_PROVIDER_KEY"
STALL_S = 1.5
LOGPROBS = [-0.1, -0.2, -0.3]
TOOL_CALLS = [{"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]


def _openai_ok(body: dict) -> dict:
    content = [{"token": t, "logprob": lp, "top_logprobs": []} for t, lp in zip(["Hel", "lo", "!"], LOGPROBS)]
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                         "logprobs": {"content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                      "prompt_tokens_details": {"cached_tokens": 4}}}


def _chunk(delta: dict, *, logprob: float | None = None, finish: str | None = None) -> dict:
    logprobs = {"content": [{"token": "x", "logprob": logprob, "top_logprobs": []}]} if logprob is not None else None
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


# Streams as lists of SSE data payloads; a float is a pause (seconds) before the next one.
OPENAI_STREAM = [
    _chunk({"role": "assistant", "content": ""}), 0.05,
    # U+2028 unescaped inside the JSON: a line splitter that honours it would cut this event in two.
    _chunk({"content": "Hel"}, logprob=-0.1), _chunk({"content": "lo\u2028"}, logprob=-0.2), 0.02,
    _chunk({"content": " world"}, logprob=-0.3, finish="stop"),
    {"object": "chat.completion.chunk", "choices": [],
     "usage": {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}},
]
OPENAI_TOOL_STREAM = [
    _chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}, finish="tool_calls"),
    {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 9}},
]
ANTHROPIC_STREAM = [
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                          "usage": {"input_tokens": 10, "output_tokens": 1,
                                                    "cache_read_input_tokens": 6}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}, 0.02,
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
     "usage": {"output_tokens": 2}},
    {"type": "message_stop"},
]


class FakeProvider(BaseHTTPRequestHandler):
    """Answers by the model named in the request body: 'ok', 'rate-limited', 'broken', 'stall', ..."""

    seen: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["content-length"]))
        body = orjson.loads(raw)
        FakeProvider.seen.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
        anthropic = self.path.endswith("/messages")
        model = body["model"]
        try:
            if model == "stall":
                if body.get("stream"):
                    return self._stream([_chunk({"content": "Hel"}, logprob=-0.5), STALL_S])
                time.sleep(STALL_S)
            if body.get("stream"):
                if model == "broken-mid-stream":
                    return self._stream([_chunk({"content": "Hel"}), {"error": {"message": "engine fell over"}}])
                if anthropic:
                    return self._stream(ANTHROPIC_STREAM)
                return self._stream(OPENAI_TOOL_STREAM if model == "tools" else OPENAI_STREAM)
            self._answer(anthropic, model, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first, as it should

    def _answer(self, anthropic: bool, model: str, body: dict) -> None:
        if model == "rate-limited":
            return self._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                              {"Retry-After": "7"})
        if model == "broken":
            return self._send(500, {"error": {"message": "The server had an error"}})
        if model == "garbled":
            return self._send(200, b'{"choices": [{"message": ')
        if model == "invalid":
            # Some providers quote what they got: the key must not come back out of our errors.
            echo = self.headers.get("authorization") or self.headers.get("x-api-key")
            return self._send(400, {"error": {"message": f"Invalid 'tools': bad schema. You sent {echo}. " + "x" * 500,
                                              "type": "invalid_request_error"}})
        if model == "too-long":
            too_long = "prompt is too long: 210000 tokens > 200000 maximum"
            return self._send(400, {"type": "error", "error": {"type": "invalid_request_error", "message": too_long}})
        if model == "huge":
            return self._send(413, {"error": {"type": "request_too_large", "message": "Request is over the maximum"}})
        if model == "denied":
            return self._send(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
        if anthropic:
            content = [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]
            if model != "tools":
                content = [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}] + content
            return self._send(200, {"id": "msg_1", "type": "message", "role": "assistant", "content": content,
                                    "stop_reason": "tool_use" if model == "tools" else "end_turn",
                                    "usage": {"input_tokens": 30, "output_tokens": 7,
                                              "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0}})
        answer = _openai_ok(body)
        if model == "no-logprobs":
            answer["choices"][0]["logprobs"] = None
            answer["usage"]["prompt_tokens_details"] = None
        if model == "tools":
            answer["choices"][0].update(message={"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
                                        finish_reason="tool_calls")
        self._send(200, answer)

    def _send(self, status: int, body, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: list) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for event in events:
            if isinstance(event, float):
                time.sleep(event)
                continue
            line = b"data: " + orjson.dumps(event) + b"\n\n"
            # Each event in two writes: a line may arrive split across reads.
            for part in (line[:9], line[9:]):
                self.wfile.write(part)
                self.wfile.flush()
        if not self.path.endswith("/messages"):
            self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def server_url() -> str:
    with serving(FakeProvider) as url:
        yield url


@pytest.fixture(autouse=True)
def key(monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    FakeProvider.seen.clear()
    return KEY


@pytest.fixture
async def backend_for(server_url):
    made = []

    def make(model: str = "ok", *, api: str = "openai", timeout_s: float = 5.0, base_url: str | None = None):
        spec = ProviderSpec(api=api, base_url=base_url or server_url, model=model, api_key_env=KEY_ENV,
                            timeout_s=timeout_s)
        made.append(ProviderBackend(spec))
        return made[-1]

    yield make
    for backend in made:
        await backend.aclose()


def chat(**fields) -> InferenceRequest:
    fields.setdefault("messages", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    return InferenceRequest(tenant="acme", route="chat", reply_to="app", **fields)


def in_ms(ms: int) -> int:
    return int(time.time() * 1000) + ms


async def test_openai_answer_is_normalised_with_confidence_and_cached_tokens(backend_for):
    done = await backend_for("ok").run(chat(sampling={"temperature": 0.3, "stop": ["\n\n"], "seed": 7}),
                                       request_id="r1", max_tokens=32)

    assert (done.text, done.finish_reason, done.expired) == ("Hello!", "stop", False)
    assert (done.tokens_in, done.tokens_out, done.cached_tokens) == (12, 3, 4)
    assert done.confidence == pytest.approx(math.exp(sum(LOGPROBS) / 3))
    assert done.ttft_ms is not None and done.ttft_ms >= 0
    sent = FakeProvider.seen[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == f"Bearer {KEY}"
    assert sent["body"] == {"model": "ok", "max_tokens": 32, "temperature": 0.3, "top_p": 1.0, "stop": ["\n\n"],
                            "seed": 7, "logprobs": True,
                            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}


async def test_openai_request_carries_prompt_schema_and_tools(backend_for):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    await backend_for("ok").run(chat(messages=None, prompt="Weather?", response_schema=schema, tools=tools),
                                request_id="r2", max_tokens=8)

    body = FakeProvider.seen[-1]["body"]
    assert body["messages"] == [{"role": "user", "content": "Weather?"}]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    assert body["tools"] == tools
    assert "seed" not in body and "stop" not in body


async def test_openai_without_logprobs_has_no_confidence(backend_for):
    done = await backend_for("no-logprobs").run(chat(), request_id="r3", max_tokens=8)

    assert done.text == "Hello!" and done.confidence is None and done.cached_tokens == 0


async def test_openai_tool_calls_alone_become_the_text(backend_for):
    done = await backend_for("tools").run(chat(), request_id="r4", max_tokens=8)

    assert done.finish_reason == "tool_calls"
    assert orjson.loads(done.text) == TOOL_CALLS


async def test_openai_stream_sends_each_delta_and_assembles_the_same_completion(backend_for):
    deltas = []

    async def on_text(text: str) -> None:
        deltas.append(text)

    done = await backend_for("ok").run(chat(), request_id="r5", max_tokens=8, on_text=on_text)

    assert deltas == ["Hel", "lo\u2028", " world"]
    assert done.text == "".join(deltas)
    assert (done.finish_reason, done.tokens_in, done.tokens_out, done.cached_tokens) == ("stop", 12, 3, 4)
    assert done.confidence == pytest.approx(math.exp(-0.2))
    assert done.ttft_ms >= 40  # the first delta came after the server's 50 ms pause
    body = FakeProvider.seen[-1]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_openai_streamed_tool_calls_arrive_whole(backend_for):
    deltas = []

    async def on_text(text: str) -> None:
        deltas.append(text)

    done = await backend_for("tools").run(chat(), request_id="r6", max_tokens=8, on_text=on_text)

    assert orjson.loads(done.text) == TOOL_CALLS
    assert deltas == [done.text]
    assert (done.finish_reason, done.tokens_in, done.tokens_out) == ("tool_calls", 20, 9)


async def test_anthropic_request_has_system_field_converted_tools_and_its_headers(backend_for):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    openai_style = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                     "parameters": schema}}
    anthropic_style = {"name": "get_time", "description": "Time now", "input_schema": {"type": "object"}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "system", "content": "Use tools."},
                {"role": "user", "content": "Weather in Oslo?"}]
    done = await backend_for("ok", api="anthropic").run(
        chat(messages=messages, tools=[openai_style, anthropic_style], sampling={"temperature": 0.5, "stop": ["END"]}),
        request_id="r7", max_tokens=64)

    sent = FakeProvider.seen[-1]
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == KEY and sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in sent["headers"]
    assert sent["body"] == {
        "model": "ok", "max_tokens": 64, "temperature": 0.5, "stop_sequences": ["END"],
        "system": "Be brief.\n\nUse tools.",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "Weather in Oslo?"}],
        "tools": [{"name": "get_weather", "description": "Weather now", "input_schema": schema}, anthropic_style],
    }
    assert (done.text, done.finish_reason, done.confidence) == ("Hello there", "stop", None)
    # The whole prompt, cached part included, as vLLM and OpenAI count it.
    assert (done.tokens_in, done.tokens_out, done.cached_tokens) == (50, 7, 20)


async def test_anthropic_tool_use_alone_becomes_the_text(backend_for):
    done = await backend_for("tools", api="anthropic").run(chat(messages=None, prompt="Weather?"),
                                                           request_id="r8", max_tokens=8)

    assert FakeProvider.seen[-1]["body"]["messages"] == [{"role": "user", "content": "Weather?"}]
    assert done.finish_reason == "tool_calls"
    assert orjson.loads(done.text) == [{"name": "get_weather", "input": {"city": "Oslo"}}]


async def test_anthropic_stream_sends_text_deltas(backend_for):
    deltas = []

    async def on_text(text: str) -> None:
        deltas.append(text)

    done = await backend_for("ok", api="anthropic").run(chat(), request_id="r9", max_tokens=2, on_text=on_text)

    assert deltas == ["Hi", " there"] and done.text == "Hi there"
    assert (done.finish_reason, done.tokens_in, done.tokens_out, done.cached_tokens) == ("length", 16, 2, 6)
    assert FakeProvider.seen[-1]["body"]["stream"] is True


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("model, error, code", [
    ("rate-limited", ProviderUnavailable, "provider_rate_limited"),
    ("broken", ProviderUnavailable, "provider_error"),
    ("garbled", ProviderUnavailable, "provider_error"),
    ("invalid", ProviderRejected, "provider_rejected"),
    ("denied", ProviderRejected, "provider_rejected"),
    ("too-long", InputTooLarge, "input_too_large"),
    ("huge", InputTooLarge, "input_too_large"),
])
async def test_failures_map_to_the_error_tree_and_never_carry_the_key(backend_for, api, model, error, code):
    with pytest.raises(error) as raised:
        await backend_for(model, api=api).run(chat(), request_id="r10", max_tokens=8)

    assert raised.value.code == code
    assert raised.value.moves_on == (error is ProviderUnavailable)
    sent = FakeProvider.seen[-1]["headers"]
    assert KEY in (sent.get("Authorization", "") + sent.get("x-api-key", ""))
    chain, exc = [], raised.value
    while exc is not None:
        chain += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    assert not any(KEY in text for text in chain)
    assert len(str(raised.value)) < ERROR_EXCERPT_CHARS + 200


async def test_rate_limit_says_when_to_come_back(backend_for):
    with pytest.raises(ProviderUnavailable) as raised:
        await backend_for("rate-limited").run(chat(), request_id="r11", max_tokens=8)

    assert raised.value.retry_after_ms == 7000 and raised.value.retriable
    assert "429" in str(raised.value) and "Rate limit reached" in str(raised.value)


async def test_invalid_request_is_the_callers_fault_and_its_excerpt_is_cut(backend_for):
    with pytest.raises(ProviderRejected) as raised:
        await backend_for("invalid").run(chat(), request_id="r12", max_tokens=8)

    assert raised.value.caller_fault
    assert "400" in str(raised.value) and "Invalid 'tools'" in str(raised.value)
    assert "Bearer [key]" in str(raised.value)


async def test_bad_key_is_ours_and_names_the_variable(backend_for):
    with pytest.raises(ProviderRejected) as raised:
        await backend_for("denied").run(chat(), request_id="r13", max_tokens=8)

    assert not raised.value.caller_fault
    assert KEY_ENV in str(raised.value) and KEY not in str(raised.value)


async def test_a_stalled_provider_times_out_and_moves_on(backend_for):
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as raised:
        await backend_for("stall", timeout_s=0.3).run(chat(), request_id="r14", max_tokens=8)

    assert raised.value.code == "provider_timeout" and raised.value.moves_on
    assert time.monotonic() - started < STALL_S


async def test_a_deadline_before_the_timeout_expires_the_request(backend_for):
    started = time.monotonic()
    done = await backend_for("stall", timeout_s=5).run(chat(), request_id="r15", max_tokens=8,
                                                        deadline_ms=in_ms(300))

    assert time.monotonic() - started < STALL_S
    assert done.expired and done.finish_reason == "deadline"
    assert (done.text, done.tokens_in, done.tokens_out, done.cached_tokens, done.ttft_ms) == ("", 0, 0, 0, None)


async def test_a_deadline_in_a_stream_keeps_the_text_so_far(backend_for):
    deltas = []

    async def on_text(text: str) -> None:
        deltas.append(text)

    done = await backend_for("stall", timeout_s=5).run(chat(), request_id="r16", max_tokens=8,
                                                        deadline_ms=in_ms(400), on_text=on_text)

    assert done.expired and done.finish_reason == "deadline"
    assert done.text == "Hel" == "".join(deltas) and done.tokens_out == 1 and done.ttft_ms is not None


async def test_a_passed_deadline_calls_nobody(backend_for):
    done = await backend_for("ok").run(chat(), request_id="r17", max_tokens=8, deadline_ms=in_ms(-1000))

    assert done.expired and done.text == "" and FakeProvider.seen == []


async def test_an_error_inside_a_stream_moves_on(backend_for):
    async def on_text(text: str) -> None:
        pass

    with pytest.raises(ProviderUnavailable) as raised:
        await backend_for("broken-mid-stream").run(chat(), request_id="r18", max_tokens=8, on_text=on_text)

    assert raised.value.code == "provider_error" and "engine fell over" in str(raised.value)


async def test_nobody_listening_is_unreachable(backend_for):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the call: nothing listens there
    with pytest.raises(ProviderUnavailable) as raised:
        await backend_for(base_url=f"http://127.0.0.1:{port}/v1").run(chat(), request_id="r19", max_tokens=8)

    assert raised.value.code == "provider_unreachable"


def test_a_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=KEY_ENV):
        ProviderBackend(ProviderSpec(api="openai", base_url="http://127.0.0.1:1/v1", model="m", api_key_env=KEY_ENV))


def test_a_base_url_without_a_scheme_is_refused():
    with pytest.raises(ConfigError, match="base_url"):
        ProviderBackend(ProviderSpec(api="openai", base_url="127.0.0.1:8000/v1", model="m"))


def test_shutdown_closes_from_sync_code_after_serving(server_url):
    backend = ProviderBackend(ProviderSpec(api="openai", base_url=server_url, model="ok", api_key_env=KEY_ENV))
    done = asyncio.run(backend.run(chat(), request_id="r20", max_tokens=8))
    backend.shutdown()

    assert done.text == "Hello!" and backend.load() == {"kv_usage": None}
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(backend.run(chat(), request_id="r21", max_tokens=8))
