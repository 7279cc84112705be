"""RoutedRequest: what the router forwards to a model topic, and DeadLetter: what it could not process."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from schemas._base import NAME_PATTERN, Message, WireModel
from schemas.policy import ModelPrice
from schemas.request import InferenceRequest


# The worker reads these off its model topic, which only routers should write to; bounded all the
# same, so that one bad message costs a dead letter, not a worker's memory.
MAX_KEY_CHARS = 512  # a Redis key: a prefix, a tenant and route, and a caller's key of at most 256
MAX_EMBEDDING_CHARS = 16 * 1024  # base64 of float16: up to 6,144 dimensions (MiniLM has 384)
MAX_HOPS = 64  # models in a fallback chain or an escalation path
MAX_REASONS = 64
MAX_REASON_CHARS = 1024


class Memo(WireModel):
    """Where the worker records the result, so repeats and cache lookups find it."""

    idempotency_key: str | None = Field(default=None, max_length=MAX_KEY_CHARS, description=(
        "Redis key of the request's idempotency claim."))
    window_s: int = Field(default=600, ge=1, description="How long the result answers repeats.")
    exact_key: str | None = Field(default=None, max_length=MAX_KEY_CHARS, description=(
        "Redis key of the exact cache entry, when the route caches."))
    cache_ttl_s: int = Field(default=3600, ge=1)
    semantic_max_entries: int = Field(default=10_000, ge=1)
    semantic_namespace: str | None = Field(default=None, max_length=MAX_KEY_CHARS, description=(
        "Semantic cache namespace, when the route caches."))
    embedding: str | None = Field(default=None, max_length=MAX_EMBEDDING_CHARS, description=(
        "The conversation's embedding: base64 of float16 values."))
    semantic_signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{16,64}$", description=(
        "The conversation's guard signature (hex): a semantic hit needs the same one."))


class Hop(WireModel):
    """A model further down the chain: where the request goes if this one fails or is not confident."""

    model: str = Field(pattern=NAME_PATTERN)
    tier: str = Field(pattern=NAME_PATTERN)
    rank: int = Field(ge=0, description="The tier's place in the policy's tiers: higher is stronger.")
    price: ModelPrice


class RoutedRequest(Message):
    """A request with the router's decision stamped on it, so the worker bills at the prices in force."""

    request: InferenceRequest
    model: str = Field(pattern=NAME_PATTERN)
    price: ModelPrice
    policy_version: str = Field(max_length=64)
    received_at_ms: int = Field(ge=0, description="When the router took the request off its topic.")
    attempt: int = Field(default=0, ge=0)
    fallbacks: list[Hop] = Field(default_factory=list, max_length=MAX_HOPS, description="Models to try next, in order, if this one cannot serve.")
    rank: int = Field(default=0, ge=0, description="The tier rank of `model`.")
    escalate_below: float | None = Field(default=None, gt=0, lt=1, description=(
        "The route's confidence threshold: a weaker answer goes on to the next stronger fallback."))
    escalation_path: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=list, max_length=MAX_HOPS, description="Models that ran it before this one, in order.")
    prefix_hash: str | None = Field(default=None, max_length=128, description=(
        "The stable-prefix hash the router keyed it by."))
    tier: str | None = Field(default=None, max_length=64, description=(
        "The tier the router judged the request to need."))
    reasons: list[Annotated[str, Field(max_length=MAX_REASON_CHARS)]] = Field(
        default_factory=list, max_length=MAX_REASONS, description="Why this model; the worker copies them onto the result.")
    memo: Memo | None = None


class DeadLetter(Message):
    """A message that could not be processed, with where it came from and why."""

    source_topic: str
    partition: int
    offset: int
    reason_code: str
    reason: str
    ts_ms: int
    payload: str = Field(description="The original bytes, decoded as UTF-8 with replacement, cut to a bounded size.")
    payload_bytes: int = Field(ge=0, description="The original size in bytes.")


class ConfidenceCheck(Message):
    """A worker's check of an answer against its route's confidence threshold, where a stronger
    model was there to escalate to. `switchyard router train --history` learns from them: an
    escalated request needed the stronger tier (hard); a confident answer did not (simple)."""

    request: InferenceRequest
    model: str = Field(pattern=NAME_PATTERN, description="The model whose answer was checked.")
    confidence: float = Field(ge=0, le=1)
    threshold: float = Field(gt=0, lt=1)
    escalated: bool
    ts_ms: int = Field(ge=0)
