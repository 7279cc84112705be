"""InferenceRequest: what a producer publishes on a requests topic."""

from __future__ import annotations

import enum
import time
import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, Field, model_validator

from schemas._base import NAME_PATTERN, Message, WireModel

MAX_TEXT_CHARS = 1_000_000
EARLIEST_MS = 1_577_836_800_000  # 2020-01-01: anything earlier is a clock or unit mistake (seconds, not ms)
LATEST_MS = 32_503_680_000_000  # 3000-01-01: anything later is a unit mistake (microseconds, not ms)
I64 = 2**63 - 1  # every integer on the wire fits a signed 64-bit field
MAX_JSON_DEPTH = 32  # response schemas and tool definitions nest at most this deep
# Their size as JSON: far above what providers take (OpenAI: 128 tools; a schema's names and
# enum values within 15,000 characters), far below the router's 1 MiB per message.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_TOOLS = 128
MAX_TOOLS_BYTES = 256 * 1024
MAX_KEY_CHARS = 256  # an idempotency or session key: the caller's id for something, not content


def _depth(value: Any, limit: int) -> int:
    """How deeply `value` nests, counting no further than `limit` + 1."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(c, limit - 1) for c in children), default=0)


def _shallow(value: Any) -> Any:
    if value is not None and _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ValueError(f"nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _at_most(limit_bytes: int):
    """A check that a JSON value (a schema, the tools) is at most `limit_bytes` written out."""
    def check(value: Any) -> Any:
        if value is None:
            return value
        try:
            size = len(orjson.dumps(value))
        except orjson.JSONEncodeError as exc:  # built in Python with what JSON cannot carry
            raise ValueError(f"cannot be written as JSON: {exc}") from None
        if size > limit_bytes:
            raise ValueError(f"is {size} bytes as JSON; at most {limit_bytes}")
        return value
    return check


ResponseSchema = Annotated[dict[str, Any], AfterValidator(_shallow), AfterValidator(_at_most(MAX_SCHEMA_BYTES))]
Tools = Annotated[list[dict[str, Any]], AfterValidator(_shallow), AfterValidator(_at_most(MAX_TOOLS_BYTES))]


class Priority(str, enum.Enum):
    interactive = "interactive"
    standard = "standard"
    batch = "batch"


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_TEXT_CHARS)


class Sampling(WireModel):
    max_tokens: int = Field(default=256, ge=1, le=131_072)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(default=None, ge=-I64 - 1, le=I64)


def new_request_id() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


class InferenceRequest(Message):
    """One request for a completion, tagged with who asks (tenant), for what (route) and how urgently."""

    id: str = Field(default_factory=new_request_id, min_length=1, max_length=128)
    tenant: str = Field(pattern=NAME_PATTERN)
    route: str = Field(pattern=NAME_PATTERN)
    priority: Priority = Priority.standard
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=1024)
    prompt: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    sampling: Sampling = Field(default_factory=Sampling)
    response_schema: ResponseSchema | None = Field(default=None, description=(
        f"A JSON Schema for the answer: at most {MAX_JSON_DEPTH} levels deep and {MAX_SCHEMA_BYTES} bytes as JSON."))
    tools: Tools | None = Field(default=None, max_length=MAX_TOOLS, description=(
        f"Tool definitions: at most {MAX_TOOLS}, {MAX_JSON_DEPTH} levels deep and {MAX_TOOLS_BYTES} bytes as JSON."))
    escalate: bool = Field(default=False, description="Frontier only: send to the top tier when the route permits.")
    deadline_unix_ms: int | None = Field(default=None, ge=0, le=LATEST_MS, description="Answer 'expired' instead of running after this instant.")
    max_cost_nano_usd: int | None = Field(default=None, ge=0, le=I64)
    idempotency_key: str | None = Field(default=None, max_length=MAX_KEY_CHARS)
    reply_to: str = Field(pattern=NAME_PATTERN, description="Results go to the reply topic of this name.")
    stream: bool = Field(default=False, description="Publish token deltas on the reply topic before the result.")
    prefix_key: str | None = Field(default=None, max_length=MAX_KEY_CHARS, description="Session key: requests sharing it share a worker and its KV cache.")
    created_at_ms: int = Field(default_factory=now_ms, ge=EARLIEST_MS, le=LATEST_MS, description="Unix ms, set by the producer.")

    @model_validator(mode="after")
    def _one_input(self) -> InferenceRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (chat) or 'prompt' (completion)")
        # A conversation may hold no more text than one prompt may.
        if self.messages is not None and (chars := sum(len(m.content) for m in self.messages)) > MAX_TEXT_CHARS:
            raise ValueError(f"the messages hold {chars} characters; at most {MAX_TEXT_CHARS} in all")
        return self
