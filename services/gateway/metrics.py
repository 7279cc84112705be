"""The gateway's metrics: what HTTP callers asked and got, and who failed to authenticate."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shared.metrics import LATENCY_BUCKETS

REQUESTS = Counter(
    "switchyard_gateway_requests_total",
    "HTTP requests the gateway answered, by endpoint, route and HTTP status code.",
    ["endpoint", "route", "code"],
)
LATENCY = Histogram(
    "switchyard_gateway_request_seconds",
    "From the HTTP request arriving to its response (streams: to the last event), by endpoint and whether it streamed.",
    ["endpoint", "stream"], buckets=LATENCY_BUCKETS,
)
FIRST_EVENT = Histogram(
    "switchyard_gateway_first_event_seconds",
    "From a streaming HTTP request arriving to its first piece of text (or its whole answer) being sent.",
    ["endpoint"], buckets=LATENCY_BUCKETS,
)
AUTH_FAILURES = Counter(
    "switchyard_gateway_auth_failures_total", "Requests refused 401: no key, or one the keys file does not list.",
)
