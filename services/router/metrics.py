"""The router's Prometheus metrics. Labels stay low-cardinality: route, tier, model, outcome and
the basis of a decision (which rule, the classifier, escalation), never tenant or request."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Histogram

from shared.metrics import LATENCY_BUCKETS

UNKNOWN_ROUTE = "_unknown"

REQUESTS = Counter("switchyard_router_requests_total", "Requests the router took, by how they ended there.",
                   ["route", "outcome"])
DECISIONS = Counter("switchyard_router_decisions_total", "Routing decisions, by chosen tier and model and why.",
                    ["route", "tier", "model", "basis"])
CACHE = Counter("switchyard_router_cache_total", "Cache and repeat lookups, by kind and result.",
                ["route", "kind", "result"])
GUARDRAILS = Counter("switchyard_router_guardrail_total",
                     "Guardrail decisions, by check (pii, injection) and decision (passed, redacted, blocked).",
                     ["route", "check", "decision"])
DECISION_SECONDS = Histogram(
    "switchyard_router_decision_seconds", "From taking a request off its topic to handing it to the producer.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
QUEUE_WAIT = Histogram(
    "switchyard_router_queue_wait_seconds", "From a request's creation to the router taking it off its topic.",
    ["priority"], buckets=LATENCY_BUCKETS,
)
EMBED_SECONDS = Histogram("switchyard_router_embed_seconds", "Embedding one batch of conversations.",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class Children:
    """A labelled metric's children, kept by label values: prometheus_client's labels() costs a few
    microseconds a call, and the router asks several times per request. The label values are
    bounded (see above), so this stays small."""

    def __init__(self, metric):
        self._metric = metric
        self._children: dict[tuple[str, ...], object] = {}

    def __call__(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Tally:
    """Counts of a batch, added to their counters once at its end: a counter's inc() takes a lock
    and costs about as much as a routing step, and a batch repeats the same few label sets."""

    def __init__(self):
        self._counts: dict[tuple[Children, tuple[str, ...]], int] = {}

    def add(self, children: Children, *values: str) -> None:
        key = (children, values)
        self._counts[key] = self._counts.get(key, 0) + 1

    def flush(self) -> None:
        for (children, values), n in self._counts.items():
            children(*values).inc(n)
        self._counts.clear()


requests = Children(REQUESTS)
decisions = Children(DECISIONS)
cache = Children(CACHE)
queue_wait = Children(QUEUE_WAIT)
guardrails = Children(GUARDRAILS)


@functools.lru_cache(maxsize=1024)
def basis(reason: str) -> str:
    """'rule: code' -> 'rule:code'; 'classifier: p(hard)=0.91 ...' -> 'classifier'."""
    head, _, rest = reason.partition(":")
    if head == "rule":
        return "rule:" + rest.strip().split(" (")[0].replace(" ", "_")[:40]
    return head.replace(" ", "_")[:40]
