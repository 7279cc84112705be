"""CostRecord: one per request, the books' only input. It never carries prompt or output text."""

from __future__ import annotations

from pydantic import Field

# The books store these as UInt32/UInt16; larger values are refused here, not by ClickHouse.
U32 = 2**32 - 1

from schemas._base import Message
from schemas.result import CacheHit, Status


class CostRecord(Message):
    # The sink writes these into ClickHouse: bounded as the request's own fields are.
    request_id: str = Field(min_length=1, max_length=128)
    attempt: int = Field(default=0, ge=0, le=2**16 - 1, description="0 for the first model call; escalations count up.")
    ts_ms: int = Field(ge=0, description="When the request was made (its created_at_ms): the same on every re-run.")
    tenant: str = Field(max_length=64)
    route: str = Field(max_length=64)
    model: str = Field(max_length=64, description="The model that ran it; empty when no model ran (rejected, expired, cache hit).")
    priority: str = Field(max_length=16)
    status: Status
    cache_hit: CacheHit = CacheHit.none
    tokens_in: int = Field(ge=0, le=U32)
    tokens_out: int = Field(ge=0, le=U32)
    cached_tokens: int = Field(default=0, ge=0, le=U32)
    cost_nano_usd: int = Field(ge=0, le=2**64 - 1, description="Exact cost in 1e-9 USD, at the prices in force when it ran.")
    latency_ms: int = Field(ge=0, le=U32)
    ttft_ms: int | None = Field(default=None, ge=0, le=U32)
