"""The OpenAI wire format, both ways: request bodies into InferenceRequests, results into
chat.completion / text_completion bodies, stream chunks and errors.

The gateway and batch jobs share it, so a line of a batch file and a body POSTed to the gateway
mean the same thing. What the platform cannot honour (several choices, logprobs, audio) is
refused with the parameter named, never silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas import ChatMessage, InferenceRequest, InferenceResult, Priority, Sampling, Status

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# Fields that change nothing about the answer here, or that only the platform decides.
_IGNORED = {"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options",
            "frequency_penalty", "presence_penalty", "logit_bias", "prompt_cache_key", "safety_identifier"}
_CHAT_FIELDS = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
                "stream", "response_format", "tools", "tool_choice"} | _IGNORED
_COMPLETION_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "echo",
                      "best_of", "suffix"} | _IGNORED


class BadRequest(ValueError):
    """A body the platform cannot run: `param` names the field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param = param
        self.code = code


def _check_fields(body: Any, allowed: set[str], what: str) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"the body of a {what} request must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unsupported parameter {unknown[0]!r} for {what}", unknown[0], "unsupported_parameter")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n", "unsupported_value")
    return body


def _text(content: Any, where: str) -> str:
    """Message content: a string, or a list of parts of which only text parts are supported."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}[{i}]: only text content parts are supported", where, "unsupported_value")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"{where} must be a string or a list of text parts", where)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _sampling(body: dict, max_tokens: Any) -> Sampling:
    fields = {"stop": _stop(body.get("stop"))}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed"):
        if body.get(name) is not None:
            fields[name] = body[name]
    try:
        return Sampling(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = "max_tokens" if error["loc"][:1] == ("max_tokens",) else ".".join(str(p) for p in error["loc"])
        raise BadRequest(f"{param}: {error['msg']}", param) from None


def _build(fields: dict, param_of: dict[str, str]) -> InferenceRequest:
    try:
        return InferenceRequest(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(p) for p in error["loc"]]
        param = param_of.get(loc[0], loc[0]) if loc else None
        raise BadRequest(f"{'.'.join(loc) or 'body'}: {error['msg']}", param) from None


def chat_request(body: Any, *, tenant: str, route: str, reply_to: str, priority: Priority = Priority.standard,
                 **fields: Any) -> InferenceRequest:
    """An InferenceRequest from a /v1/chat/completions body; BadRequest names what is wrong."""
    body = _check_fields(body, _CHAT_FIELDS, "chat completion")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list is required", "messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", "messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}].role: {m.get('role')!r} is not one of system, developer, user, "
                             "assistant, tool", "messages")
        chat.append(ChatMessage(role=role, content=_text(m.get("content"), f"messages[{i}].content")))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    schema = None
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequest("response_format.json_schema.schema must be an object", "response_format")
        elif kind == "json_object":
            schema = {"type": "object"}
        elif kind != "text":
            raise BadRequest(f"response_format.type {kind!r} is not one of text, json_object, json_schema",
                             "response_format")
    return _build({"tenant": tenant, "route": route, "reply_to": reply_to, "priority": priority,
                   "messages": chat, "sampling": _sampling(body, max_tokens), "response_schema": schema,
                   "tools": body.get("tools"), "stream": bool(body.get("stream", False)), **fields},
                  {"response_schema": "response_format", "sampling": "max_tokens"})


def completion_request(body: Any, *, tenant: str, route: str, reply_to: str, priority: Priority = Priority.standard,
                       **fields: Any) -> InferenceRequest:
    """An InferenceRequest from a /v1/completions body (one prompt, as a string or a list of one)."""
    body = _check_fields(body, _COMPLETION_FIELDS, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt: one string is supported (or a list holding one)", "prompt")
    for name in ("echo", "best_of", "suffix"):
        if body.get(name) not in (None, False, 1):
            raise BadRequest(f"{name} is not supported", name, "unsupported_value")
    return _build({"tenant": tenant, "route": route, "reply_to": reply_to, "priority": priority, "prompt": prompt,
                   "sampling": _sampling(body, body.get("max_tokens", 16)),
                   "stream": bool(body.get("stream", False)), **fields}, {"sampling": "max_tokens"})


def response_id(result: InferenceResult | str, kind: str = "chatcmpl") -> str:
    request_id = result if isinstance(result, str) else result.request_id
    return f"{kind}-{request_id}"


def usage(result: InferenceResult) -> dict:
    return {"prompt_tokens": result.tokens_in, "completion_tokens": result.tokens_out,
            "total_tokens": result.tokens_in + result.tokens_out,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def chat_completion(result: InferenceResult, created: int) -> dict:
    return {"id": response_id(result), "object": "chat.completion", "created": created,
            "model": result.model or "", "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.output, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage(result), "switchyard": extension(result)}


def text_completion(result: InferenceResult, created: int) -> dict:
    return {"id": response_id(result, "cmpl"), "object": "text_completion", "created": created,
            "model": result.model or "",
            "choices": [{"index": 0, "text": result.output, "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage(result), "switchyard": extension(result)}


def chat_chunk(request_id: str, created: int, model: str | None, *, content: str | None = None,
               role: str | None = None, finish: str | None = None) -> dict:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"id": response_id(request_id), "object": "chat.completion.chunk", "created": created,
            "model": model or "", "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_chunk(request_id: str, created: int, model: str | None, *, text: str = "",
                     finish: str | None = None) -> dict:
    return {"id": response_id(request_id, "cmpl"), "object": "text_completion", "created": created,
            "model": model or "", "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def finish_reason(result: InferenceResult) -> str:
    """OpenAI's finish reasons are stop, length, tool_calls and content_filter; engines say more."""
    return "length" if result.finish_reason == "length" else "stop"


def extension(result: InferenceResult) -> dict:
    """What the platform adds: how it routed and what answered, never the cost (that is in the books)."""
    return {"request_id": result.request_id, "model": result.model, "tier": result.tier,
            "cache_hit": result.cache_hit.value, "escalation_path": result.escalation_path,
            "route_reasons": result.route_reasons, "confidence": result.confidence}


# status, error type, for each error code a result can carry; anything else by status.
_ERRORS: dict[str, tuple[int, str]] = {
    "input_invalid": (400, "invalid_request_error"),
    "input_too_large": (400, "invalid_request_error"),
    "undecodable": (400, "invalid_request_error"),
    "duplicate_request_id": (409, "invalid_request_error"),
    "escalation_not_allowed": (403, "permission_error"),
    "unknown_route": (404, "invalid_request_error"),
    "no_capable_model": (422, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "provider_rate_limited": (429, "rate_limit_error"),
    "deadline_passed": (504, "timeout_error"),
    "provider_timeout": (504, "timeout_error"),
}
_BY_STATUS = {Status.rejected: (400, "invalid_request_error"), Status.expired: (504, "timeout_error"),
              Status.failed: (502, "server_error"), Status.blocked: (400, "invalid_request_error")}


def error_status(result: InferenceResult) -> tuple[int, dict, dict[str, str]]:
    """For a result that is not ok: the HTTP status, the OpenAI error body, and headers (Retry-After)."""
    code = result.error.code if result.error else result.status.value
    message = result.error.message if result.error else f"the request ended {result.status.value}"
    status, kind = _ERRORS.get(code, _BY_STATUS.get(result.status, (500, "server_error")))
    if result.status == Status.failed and result.error and result.error.retriable and status == 502:
        status = 503
    headers = {}
    if result.error and result.error.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, -(-result.error.retry_after_ms // 1000)))
    return status, error_body(message, kind, code, request_id=result.request_id), headers


def error_body(message: str, kind: str, code: str | None, param: str | None = None,
               request_id: str | None = None) -> dict:
    error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if request_id:
        error["request_id"] = request_id
    return {"error": error}
