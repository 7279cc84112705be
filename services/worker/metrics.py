"""The worker's Prometheus metrics: what it ran, how long each phase took, what it used and cost.
Labels: model, route, outcome, kind, reason; never tenant or request."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import COUNT_BUCKETS, LATENCY_BUCKETS

REQUESTS = Counter(
    "switchyard_worker_requests_total",
    "Attempts this worker ended, by route, model and outcome (a result status, or handed_on to the next model).",
    ["route", "model", "outcome"],
)
QUEUE_WAIT = Histogram(
    "switchyard_worker_queue_wait_seconds", "From the request's creation to a worker taking it off its model topic.",
    ["model"], buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "switchyard_worker_ttft_seconds", "From a worker starting a request to its first token.",
    ["model"], buckets=LATENCY_BUCKETS,
)
GENERATION = Histogram(
    "switchyard_worker_generation_seconds", "From a worker starting a request to its last token.",
    ["model"], buckets=LATENCY_BUCKETS,
)
TOTAL = Histogram(
    "switchyard_request_seconds", "From the request's creation to its answer, for answers a model gave.",
    ["route", "model"], buckets=LATENCY_BUCKETS,
)
TOKENS = Counter(
    "switchyard_worker_tokens_total",
    "Tokens processed: prompt, completion, and prompt tokens served from the prefix cache (cached).",
    ["route", "model", "kind"],
)
COST = Counter(
    "switchyard_worker_cost_usd_total", "What the attempts this worker ran cost, at the price in the routed request.",
    ["route", "model"],
)
HANDOFFS = Counter(
    "switchyard_worker_handoffs_total",
    "Attempts handed to the next model: escalated on low confidence, or moved on after a failure.",
    ["route", "model", "reason"],
)
CONFIDENCE = Histogram(
    "switchyard_worker_confidence", "Confidence of the answers that were checked (geometric mean token probability).",
    ["route", "model"], buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
)
REPLAYED = Counter(
    "switchyard_worker_replayed_total",
    "Redelivered attempts taken from the ledger instead of run again: their recorded messages resent, or "
    "nothing sent because the broker had acknowledged them before.", ["model", "how"],
)
OUTPUT_CHECKS = Counter(
    "switchyard_worker_output_checks_total",
    "Answers to requests with a response_schema, by how the JSON check ended: passed, repaired (after one "
    "retry through the same model) or refused (invalid_output).",
    ["route", "model", "outcome"],
)
IN_FLIGHT = Gauge("switchyard_worker_in_flight", "Requests running on this worker now.", ["model"])
CAPACITY = Gauge("switchyard_worker_capacity", "Requests this worker runs at once at most.", ["model"])
ENGINE_BATCH = Histogram(
    "switchyard_engine_batch_size", "Sequences the engine ran together, one observation per scheduler step.",
    ["model"], buckets=COUNT_BUCKETS,
)
KV_USAGE = Gauge("switchyard_engine_kv_cache_usage_ratio", "Share of the engine's KV cache in use.", ["model"])
