"""The two provider API dialects: how a request is put to each, and how its answer, whole or
streamed, is read back into the one shape a Completion has."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.request import InferenceRequest
from services.worker.engine import Completion, confidence_of

ANTHROPIC_VERSION = "2023-06-01"
_ANTHROPIC_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


class StreamFailed(Exception):
    """The provider reported an error inside a stream it had already started (its payload is the argument)."""


@dataclass
class Answer:
    """What a call has produced so far: a whole response fills it at once, a stream piece by piece."""

    started: float = field(default_factory=time.monotonic)
    pieces: list[str] = field(default_factory=list)
    # OpenAI: its tool_calls list as sent; Anthropic: [{name, input}] from its tool_use blocks.
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    # Content chunks seen: the output count of a stream cut off before its usage arrived.
    chunks: int = 0
    ttft_ms: int | None = None
    # Anthropic tool_use blocks whose input is still arriving, by content block index.
    open_tools: dict[int, tuple[dict[str, Any], list[str]]] = field(default_factory=dict)

    def first_token(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = int((time.monotonic() - self.started) * 1000)

    @property
    def streamed(self) -> str:
        return "".join(self.pieces)

    @property
    def text(self) -> str:
        """The content; a tool call's JSON when the model answered with tool calls alone."""
        text = self.streamed
        if not text and self.tool_calls:
            return orjson.dumps(self.tool_calls).decode()
        return text

    def completion(self, *, expired: bool = False) -> Completion:
        if expired:
            text, finish = self.streamed, "deadline"
        elif self.tool_calls and not self.streamed:
            text, finish = self.text, "tool_calls"
        else:
            text, finish = self.text, self.finish_reason
        tokens_out = self.tokens_out if self.tokens_out is not None else len(self.logprobs) or self.chunks
        return Completion(text=text, finish_reason=finish, tokens_in=self.tokens_in or 0, tokens_out=tokens_out,
                          cached_tokens=self.cached_tokens, ttft_ms=self.ttft_ms,
                          confidence=confidence_of(self.logprobs), expired=expired)


class OpenAI:
    """Any OpenAI-compatible /chat/completions (OpenAI itself, vLLM, and most gateways)."""

    path = "/chat/completions"

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def body(self, model: str, request: InferenceRequest, max_tokens: int, *, stream: bool) -> dict[str, Any]:
        sampling = request.sampling
        if request.messages is not None:
            messages = [m.model_dump() for m in request.messages]
        else:
            messages = [{"role": "user", "content": request.prompt}]
        body: dict[str, Any] = {
            "model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "logprobs": True,  # the sampled tokens' log-probabilities: the answer's confidence
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if request.response_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "response", "schema": request.response_schema}}
        if request.tools:
            body["tools"] = request.tools
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def read(self, data: dict[str, Any], answer: Answer) -> None:
        choice = data["choices"][0]
        message = choice["message"]
        if message.get("content"):
            answer.pieces.append(message["content"])
        answer.tool_calls = list(message.get("tool_calls") or [])
        answer.finish_reason = choice.get("finish_reason")
        answer.logprobs = _logprobs(choice)
        _openai_usage(data.get("usage"), answer)

    def read_chunk(self, data: dict[str, Any], answer: Answer) -> str:
        """Take one streamed chunk; returns its content delta ("" when it has none)."""
        if "error" in data:
            raise StreamFailed(data["error"])
        _openai_usage(data.get("usage"), answer)
        text = ""
        for choice in data.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                _merge_call(answer.tool_calls, call)
                answer.first_token()
            answer.logprobs.extend(_logprobs(choice))
            if choice.get("finish_reason"):
                answer.finish_reason = choice["finish_reason"]
        if text:
            answer.first_token()
            answer.pieces.append(text)
            answer.chunks += 1
        return text


class Anthropic:
    """The Anthropic Messages API, /messages."""

    path = "/messages"

    def headers(self, key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if key:
            headers["x-api-key"] = key
        return headers

    def body(self, model: str, request: InferenceRequest, max_tokens: int, *, stream: bool) -> dict[str, Any]:
        sampling = request.sampling
        system = []
        messages = []
        if request.messages is None:
            messages.append({"role": "user", "content": request.prompt})
        for m in request.messages or []:
            if m.role == "system":
                system.append(m.content)
            else:
                # The Messages API knows only user and assistant turns; a tool's output is the user's.
                messages.append({"role": "assistant" if m.role == "assistant" else "user", "content": m.content})
        # Anthropic's temperature stops at 1, and newer models refuse temperature and top_p together:
        # top_p goes only where the request narrows it.
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": messages,
                                "temperature": min(sampling.temperature, 1.0)}
        if sampling.top_p < 1.0:
            body["top_p"] = sampling.top_p
        if system:
            body["system"] = "\n\n".join(system)
        if sampling.stop:
            body["stop_sequences"] = list(sampling.stop)
        if request.tools:
            body["tools"] = [_anthropic_tool(tool) for tool in request.tools]
        if stream:
            body["stream"] = True
        return body

    def read(self, data: dict[str, Any], answer: Answer) -> None:
        for block in data["content"]:
            if block["type"] == "text":
                answer.pieces.append(block["text"])
            elif block["type"] == "tool_use":
                answer.tool_calls.append({"name": block["name"], "input": block.get("input") or {}})
        answer.finish_reason = _ANTHROPIC_FINISH.get(data.get("stop_reason"), data.get("stop_reason"))
        _anthropic_usage(data.get("usage"), answer)

    def read_chunk(self, data: dict[str, Any], answer: Answer) -> str:
        """Take one streamed event; returns its text delta ("" when it has none)."""
        kind = data["type"]
        if kind == "error":
            raise StreamFailed(data.get("error"))
        if kind == "message_start":
            _anthropic_usage(data["message"].get("usage"), answer)
            answer.tokens_out = None  # message_start's output count is a placeholder
        elif kind == "content_block_start" and data["content_block"]["type"] == "tool_use":
            block = data["content_block"]
            tool = {"name": block["name"], "input": block.get("input") or {}}
            answer.tool_calls.append(tool)
            answer.open_tools[data["index"]] = (tool, [])
        elif kind == "content_block_delta":
            delta = data["delta"]
            answer.first_token()
            if delta["type"] == "text_delta" and delta["text"]:
                answer.pieces.append(delta["text"])
                answer.chunks += 1
                return delta["text"]
            if delta["type"] == "input_json_delta":
                answer.open_tools[data["index"]][1].append(delta["partial_json"])
        elif kind == "content_block_stop" and data["index"] in answer.open_tools:
            tool, parts = answer.open_tools.pop(data["index"])
            if "".join(parts):
                tool["input"] = orjson.loads("".join(parts))
        elif kind == "message_delta":
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason:
                answer.finish_reason = _ANTHROPIC_FINISH.get(reason, reason)
            usage = data.get("usage") or {}
            if usage.get("output_tokens") is not None:
                answer.tokens_out = usage["output_tokens"]
        return ""


def _logprobs(choice: dict[str, Any]) -> list[float]:
    content = (choice.get("logprobs") or {}).get("content") or []
    return [entry["logprob"] for entry in content if entry.get("logprob") is not None]


def _openai_usage(usage: dict[str, Any] | None, answer: Answer) -> None:
    if not usage:
        return
    answer.tokens_in = usage.get("prompt_tokens")
    answer.tokens_out = usage.get("completion_tokens")
    answer.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def _anthropic_usage(usage: dict[str, Any] | None, answer: Answer) -> None:
    if not usage:
        return
    cached = usage.get("cache_read_input_tokens") or 0
    # Anthropic counts cached and cache-writing prompt tokens apart from input_tokens; tokens_in is
    # the whole prompt everywhere else (vLLM, OpenAI), with cached_tokens a part of it.
    answer.tokens_in = (usage.get("input_tokens") or 0) + cached + (usage.get("cache_creation_input_tokens") or 0)
    answer.tokens_out = usage.get("output_tokens")
    answer.cached_tokens = cached


def _merge_call(calls: list[dict[str, Any]], delta: dict[str, Any]) -> None:
    """Fold one streamed tool-call fragment into the list, by its index."""
    index = delta.get("index", len(calls))
    while len(calls) <= index:
        calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[index]
    if delta.get("id"):
        call["id"] = delta["id"]
    function = delta.get("function") or {}
    call["function"]["name"] += function.get("name") or ""
    call["function"]["arguments"] += function.get("arguments") or ""


def _anthropic_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-style function tool in Anthropic's shape; one already in that shape passes as is."""
    if tool.get("type") != "function" or "function" not in tool:
        return tool
    function = tool["function"]
    converted = {"name": function["name"],
                 "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        converted["description"] = function["description"]
    return converted
