"""The sink's Prometheus metrics: what it booked, in what batches, how fast, and what the books say
things cost by tenant, route and model (tenant bounded by shared.metrics.tenant_label)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shared.metrics import COUNT_BUCKETS

RECORDS = Counter(
    "switchyard_sink_records_total",
    "Records the sink took (cost records and quality scores): inserted into the books, or dead-lettered.",
    ["outcome"],
)
BATCH_ROWS = Histogram("switchyard_sink_batch_rows", "Rows per insert into ClickHouse.", buckets=COUNT_BUCKETS)
INSERT_SECONDS = Histogram(
    "switchyard_sink_insert_seconds", "One batch insert into ClickHouse.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BOOKED = Counter(
    "switchyard_booked_requests_total",
    "Cost records booked, by route, model, status and cache hit; attempt 0 of each request only, so each "
    "request counts once (model is the first model that ran it, empty for answers from memory or rejections).",
    ["route", "model", "status", "cache_hit"],
)
COST = Counter(
    "switchyard_booked_cost_usd_total", "Spend as booked, by tenant, route and model.", ["tenant", "route", "model"],
)
TOKENS = Counter(
    "switchyard_booked_tokens_total", "Tokens booked, by tenant and direction (in, out).", ["tenant", "direction"],
)
