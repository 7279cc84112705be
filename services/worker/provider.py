"""A worker backend that serves a model through an external API (OpenAI-compatible or Anthropic
Messages) over one pooled httpx client, answering in the same Completion a vLLM engine returns.

Failures are translated into the shared error tree here: what another model could serve (429, 5xx,
timeouts, an unreachable host, a garbled answer) is ProviderUnavailable, which moves the request on
down its chain; this backend never retries the same endpoint itself. The API key never leaves the
request headers: error messages are built from the status and a scrubbed excerpt of the body.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from schemas.policy import ProviderSpec
from schemas.request import InferenceRequest
from services.worker.engine import Completion, OnText, seconds_until
from services.worker.provider_apis import Answer, Anthropic, OpenAI, StreamFailed
from shared.errors import (ConfigError, InputTooLarge, ProviderRejected, ProviderUnavailable,
                           SwitchyardError)
from shared.settings import masked

ERROR_EXCERPT_CHARS = 300
_DIALECTS = {"openai": OpenAI, "anthropic": Anthropic}
_JSON = {"content-type": "application/json"}
# What reading a provider's answer raises when it is not the shape its API promises.
_UNREADABLE = (KeyError, IndexError, TypeError, ValueError, AttributeError)
# How providers say the prompt is over the model's context, whatever the status code.
_CONTEXT_LENGTH = re.compile(r"context.length|context window|maximum context|prompt is too long", re.I)
# What an API key is made of. A newline or other control character in it makes the HTTP library refuse
# the header with an error that quotes the value escaped, where scrubbing the key would not find it.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


class ProviderBackend:
    """One model behind a provider API: shapes each request for it, calls it, normalises the answer."""

    def __init__(self, spec: ProviderSpec, *, max_connections: int = 64):
        key = None
        if spec.api_key_env is not None:
            # A key read from a mounted secret file usually ends in a newline that is not part of it.
            key = os.environ.get(spec.api_key_env, "").strip()
            if not key:
                raise ConfigError(f"provider model {spec.model!r} reads its API key from the environment "
                                  f"variable {spec.api_key_env}, which is not set")
            if not _KEY_CHARS.fullmatch(key):
                raise ConfigError(f"the API key in {spec.api_key_env} holds spaces, control or non-ASCII "
                                  "characters, which no API key has: check how the variable is set")
        url = httpx.URL(spec.base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"provider.base_url {masked(spec.base_url)!r} is not an http(s) URL")
        if url.userinfo:
            # The policy travels on a Kafka topic and sits in files: a credential there is one leaked.
            raise ConfigError(f"provider.base_url {masked(spec.base_url)!r} carries credentials; "
                              "put the key in the environment variable that provider.api_key_env names")
        self.spec = spec
        self._key = key
        self._dialect = _DIALECTS[spec.api]()
        self._url = spec.base_url.rstrip("/") + self._dialect.path
        self._where = f"{spec.api} provider at {url.host}" + (f":{url.port}" if url.port else "")
        # One client for every request in flight: connections are pooled and kept alive.
        self._client = httpx.AsyncClient(
            headers=self._dialect.headers(key), timeout=spec.timeout_s,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._closing: asyncio.Task | None = None

    async def run(self, request: InferenceRequest, *, request_id: str, max_tokens: int,
                  deadline_ms: int | None = None, on_text: OnText | None = None) -> Completion:
        """Call the provider once; raises ProviderUnavailable (moves on), ProviderRejected or InputTooLarge."""
        budget_s = seconds_until(deadline_ms)
        if budget_s == 0:
            return Answer().completion(expired=True)
        limit_s = self.spec.timeout_s if budget_s is None else min(self.spec.timeout_s, budget_s)
        # When the deadline comes first, running out of time is the request's expiry, not the provider's fault.
        by_deadline = budget_s is not None and budget_s <= self.spec.timeout_s
        body = orjson.dumps(self._dialect.body(self.spec.model, request, max_tokens, stream=on_text is not None))
        answer = Answer()
        try:
            async with asyncio.timeout(limit_s):
                if on_text is None:
                    await self._call(body, answer, limit_s)
                else:
                    await self._stream(body, answer, limit_s, on_text)
        except (TimeoutError, httpx.TimeoutException):
            if by_deadline:
                return answer.completion(expired=True)
            raise ProviderUnavailable(f"{self._where} did not answer request {request_id} within "
                                      f"{limit_s:g} s (provider.timeout_s)", code="provider_timeout") from None
        except httpx.TransportError as exc:
            unreachable = isinstance(exc, httpx.ConnectError)
            raise ProviderUnavailable(
                f"{self._where} {'could not be reached' if unreachable else 'broke off the answer'}: "
                f"{self._excerpt(str(exc) or type(exc).__name__)}",
                code="provider_unreachable" if unreachable else "provider_error",
            ) from exc
        if on_text is not None and not answer.streamed and answer.text:
            await on_text(answer.text)  # tool calls stream as fragments; the caller gets them whole
        return answer.completion()

    async def _call(self, body: bytes, answer: Answer, limit_s: float) -> None:
        response = await self._client.post(self._url, content=body, headers=_JSON, timeout=limit_s)
        answer.first_token()
        if not response.is_success:
            raise self._refusal(response.status_code, response.content, response.headers)
        try:
            self._dialect.read(orjson.loads(response.content), answer)
        except _UNREADABLE:
            raise self._malformed(response.content) from None

    async def _stream(self, body: bytes, answer: Answer, limit_s: float, on_text: OnText) -> None:
        async with self._client.stream("POST", self._url, content=body, headers=_JSON, timeout=limit_s) as response:
            if not response.is_success:
                raise self._refusal(response.status_code, await response.aread(), response.headers)
            async for data in _sse_data(response):
                try:
                    piece = self._dialect.read_chunk(orjson.loads(data), answer)
                except StreamFailed as exc:
                    raise ProviderUnavailable(f"{self._where} failed mid-stream: {self._detail(exc.args[0])[0]}",
                                              code="provider_error") from None
                except _UNREADABLE:
                    raise self._malformed(data) from None
                if piece:
                    await on_text(piece)

    def _refusal(self, status: int, content: bytes, headers: httpx.Headers) -> SwitchyardError:
        """The error a non-2xx answer stands for."""
        message, code = self._detail(_json_or_none(content), content)
        said = f"{self._where} answered {status}: {message}"
        if status == 429:
            return ProviderUnavailable(said, code="provider_rate_limited", retry_after_ms=_retry_after_ms(headers))
        if status >= 500:
            return ProviderUnavailable(said, code="provider_error")
        if status == 413 or code == "context_length_exceeded" or _CONTEXT_LENGTH.search(message):
            return InputTooLarge(f"the input is over what {self.spec.model} takes ({said})")
        if status in (400, 422):
            error = ProviderRejected(f"the request is invalid for {self.spec.model} ({said})")
            error.caller_fault = True  # what was sent is wrong: every model would refuse it the same way
            return error
        if status in (401, 403):
            where_key = f"the key in {self.spec.api_key_env}" if self.spec.api_key_env else "provider.api_key_env"
            return ProviderRejected(f"{said}; check {where_key}")
        return ProviderRejected(f"{said}; check provider.base_url and provider.model ({self.spec.model!r})")

    def _malformed(self, content: bytes) -> ProviderUnavailable:
        text = content.decode("utf-8", "replace")
        return ProviderUnavailable(f"{self._where} answered with something that is not a {self.spec.api} "
                                   f"response: {self._excerpt(text)}", code="provider_error")

    def _detail(self, data: Any, raw: bytes = b"") -> tuple[str, str | None]:
        """A key-free excerpt of a provider's error, and its error code where it gives one."""
        error = data.get("error", data) if isinstance(data, dict) else data
        message, code = None, None
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")
            code = error.get("code") if isinstance(error.get("code"), str) else error.get("type")
        elif isinstance(error, str):
            message = error
        if not isinstance(message, str):
            message = raw.decode("utf-8", "replace") if raw else orjson.dumps(data).decode()
        return self._excerpt(message), code if isinstance(code, str) else None

    def _excerpt(self, text: str) -> str:
        # Scrubbed before it is cut, so that no cut can leave part of the key behind.
        if self._key:
            text = text.replace(self._key, "[key]")
        text = " ".join(text.split()) or "(empty body)"
        return text if len(text) <= ERROR_EXCERPT_CHARS else text[:ERROR_EXCERPT_CHARS] + "…"

    def load(self) -> dict[str, float | None]:
        return {"kv_usage": None}  # a provider's KV cache is its own business

    async def aclose(self) -> None:
        await self._client.aclose()

    def shutdown(self) -> None:
        """Close the client from sync code: on the running loop (awaited by no one), or here when none runs.
        Prefer `await aclose()` inside the loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.aclose())
            return
        self._closing = loop.create_task(self.aclose())


async def _sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """The data fields of a server-sent event stream, up to `[DONE]`. Lines are split on line feeds
    only: httpx's aiter_lines also splits on U+2028 and other separators JSON may carry unescaped."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                if data:
                    yield data
    if buffer.startswith(b"data:") and buffer[5:].strip() not in (b"", b"[DONE]"):
        yield buffer[5:].strip()


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


def _retry_after_ms(headers: httpx.Headers) -> int | None:
    """Retry-After as milliseconds: OpenAI's retry-after-ms, or seconds, or an HTTP date."""
    for name, scale in (("retry-after-ms", 1), ("retry-after", 1000)):
        value = headers.get(name)
        if value:
            try:
                return max(0, int(float(value) * scale))
            except ValueError:
                pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, int((when.timestamp() - time.time()) * 1000))
