"""InferenceResult: what comes back on a reply topic, one per request."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import Field

from schemas._base import Message, WireModel


class Status(str, enum.Enum):
    ok = "ok"
    rejected = "rejected"
    failed = "failed"
    expired = "expired"
    blocked = "blocked"  # a route's guardrail refused it: the error says which and why


class CacheHit(str, enum.Enum):
    none = "none"
    exact = "exact"
    semantic = "semantic"
    idempotent = "idempotent"  # a repeat of a request already run: it got the first one's result


class ErrorInfo(WireModel):
    code: str = Field(description="Stable, machine-readable: input_invalid, unknown_route, engine_error, ...")
    message: str
    retriable: bool = False
    retry_after_ms: int | None = Field(default=None, ge=0, description="When retriable: how long to wait first.")


class Latency(WireModel):
    queue_ms: int = Field(default=0, ge=0, description="From the request's creation to the engine taking it.")
    ttft_ms: int | None = Field(default=None, ge=0, description="From the engine taking it to the first output token.")
    total_ms: int = Field(default=0, ge=0, description="From the request's creation to the result.")


class InferenceResult(Message):
    kind: Literal["result"] = Field(default="result", description="Tells a result from a StreamDelta on a reply topic.")
    request_id: str
    tenant: str
    route: str
    status: Status
    output: str = ""
    finish_reason: str | None = None
    model: str | None = None
    tokens_in: int = Field(default=0, ge=0)
    tokens_out: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0, description="Prompt tokens served from the engine's prefix cache.")
    cache_hit: CacheHit = CacheHit.none
    latency: Latency = Field(default_factory=Latency)
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    escalation_path: list[str] = Field(default_factory=list)
    tier: str | None = Field(default=None, description="The tier the router judged the request to need.")
    route_reasons: list[str] = Field(default_factory=list, description="Why the router chose this model.")
    replay_of: str | None = Field(default=None, description="For a cache hit or repeat: the request whose result this is.")
    error: ErrorInfo | None = None


class StreamDelta(Message):
    """Text a streaming request has produced so far, sent on its reply topic before the result.

    Deltas of one request come in order (they share its partition); `seq` counts from 0. The
    InferenceResult that follows is the whole answer: a client that lost a delta loses nothing."""

    kind: Literal["delta"] = "delta"
    request_id: str
    seq: int = Field(ge=0)
    text: str
    model: str | None = None
    attempt: int = Field(default=0, ge=0, description=(
        "Which attempt produced it: deltas of a higher attempt (after an escalation or fallback) start the text anew."))
