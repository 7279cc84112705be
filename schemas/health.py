"""ModelHealth: what each worker reports about its model every few seconds."""

from __future__ import annotations

from pydantic import Field

from schemas._base import Message


class ModelHealth(Message):
    model: str
    worker: str = Field(description="Which worker process: host and pid.")
    ts_ms: int = Field(ge=0, description="When the report was made.")
    interval_s: float = Field(gt=0, description="How often this worker reports: older reports are stale.")
    window_s: float = Field(gt=0, description="The span the counts and latencies below cover.")
    requests: int = Field(ge=0, description="Requests finished in the window.")
    errors: int = Field(ge=0, description="Of those, how many failed (status failed).")
    p95_latency_ms: int | None = Field(default=None, ge=0, description="From taking a request to its result.")
    in_flight: int = Field(ge=0)
    capacity: int = Field(ge=1, description="How many requests it runs at once at most.")
    backlog: int = Field(ge=0, description="Requests waiting on its partitions, not yet taken.")
    partition_backlog: dict[int, int] = Field(default_factory=dict, description=(
        "Per partition of the model topic this worker owns: requests waiting. The router spills hot prefixes by it."))
    kv_usage: float | None = Field(default=None, ge=0, le=1, description="Share of the engine's KV cache in use.")
    prefix_hit_rate: float | None = Field(default=None, ge=0, le=1, description=(
        "Prompt tokens served from the prefix cache, as a share of prompt tokens, over the window."))
