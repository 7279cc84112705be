"""RoutedRequest: what the router forwards to a model topic, and DeadLetter: what it could not process."""

from __future__ import annotations

from pydantic import Field

from schemas._base import Message
from schemas.policy import ModelPrice
from schemas.request import InferenceRequest


class RoutedRequest(Message):
    """A request with the router's decision stamped on it, so the worker bills at the prices in force."""

    request: InferenceRequest
    model: str
    price: ModelPrice
    policy_version: str
    received_at_ms: int = Field(ge=0, description="When the router took the request off its topic.")
    attempt: int = Field(default=0, ge=0)
    fallbacks: list[str] = Field(default_factory=list, description="Models to try next, in order, if this one cannot serve.")
    reasons: list[str] = Field(default_factory=list, description="Why this model; the worker copies them onto the result.")


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
