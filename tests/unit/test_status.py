"""The status page's figures, from metrics text written by prometheus-client itself."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.stack.status import figures, increase, parse, quantile
from shared.metrics import OTHER_TENANTS, BoundedLabels


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile():
    # 10 observations: 4 at or under 0.1 s, 6 more at or under 0.5 s, none above.
    cumulative = {0.1: 4.0, 0.5: 10.0, float("inf"): 10.0}
    assert quantile(0.4, cumulative) == pytest.approx(0.1)
    assert quantile(0.5, cumulative) == pytest.approx(0.1 + 0.4 * (1 / 6))
    assert quantile(1.0, cumulative) == pytest.approx(0.5)
    assert quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    # Everything beyond the last finite bound: the bound is the most that can be said.
    assert quantile(0.99, {0.1: 0.0, 1.0: 0.0, float("inf"): 3.0}) == 1.0


def test_a_counter_that_went_down_was_reset():
    assert increase(15, 10) == 5
    assert increase(3, 10) == 3


def _scrapes():
    registry = CollectorRegistry()
    routed = Counter("switchyard_router_requests_total", "", ["route", "outcome"], registry=registry)
    latency = Histogram("switchyard_request_seconds", "", ["route", "model"], registry=registry,
                        buckets=(0.1, 1.0, 10.0))
    cost = Counter("switchyard_booked_cost_usd_total", "", ["tenant", "route", "model"], registry=registry)
    booked = Counter("switchyard_booked_requests_total", "", ["route", "model", "status", "cache_hit"],
                     registry=registry)
    in_flight = Gauge("switchyard_worker_in_flight", "", ["model"], registry=registry)
    cache = Counter("switchyard_router_cache_total", "", ["route", "kind", "result"], registry=registry)

    routed.labels("chat", "routed").inc(100)
    latency.labels("chat", "small").observe(5.0)  # an old slow one, before the window
    old = parse(generate_latest(registry).decode())

    routed.labels("chat", "routed").inc(60)
    for _ in range(9):
        latency.labels("chat", "small").observe(0.05)
    latency.labels("chat", "large").observe(0.5)
    cost.labels("acme", "chat", "large").inc(0.002)
    cost.labels("acme", "chat", "small").inc(0.0005)
    cost.labels("globex", "chat", "small").inc(0.001)
    booked.labels("chat", "small", "ok", "none").inc(6)
    booked.labels("chat", "", "ok", "exact").inc(4)
    cache.labels("chat", "exact", "hit").inc(4)
    cache.labels("chat", "exact", "miss").inc(6)
    in_flight.labels("small").set(3)
    return old, parse(generate_latest(registry).decode())


def test_rates_and_latency_are_over_the_window_and_costs_are_totals():
    old, new = _scrapes()
    shown = figures(new, old, span_s=20.0)
    assert shown["throughput"]["requests_per_s"] == 3.0  # 60 more in 20 s
    # Ten answers in the window, nine of them under 100 ms: the old 5 s answer is not in it.
    assert shown["latency_ms"]["basis"] == "window"
    assert shown["latency_ms"]["p50"] == pytest.approx(100 * 5 / 9, abs=0.1)
    assert shown["latency_ms"]["p99"] > 100
    assert [t["tenant"] for t in shown["cost_by_tenant"]] == ["acme", "globex"]
    assert shown["cost_by_tenant"][0]["usd"] == pytest.approx(0.0025)
    assert shown["cost_usd"] == pytest.approx(0.0035)
    assert shown["cache"]["hit_rate"] == pytest.approx(0.4)
    assert shown["cache"]["lookups"]["exact"] == {"hits": 4, "lookups": 10, "hit_rate": 0.4}
    assert shown["models"]["small"]["in_flight"] == 3


def test_without_an_older_scrape_latency_is_since_start():
    _, new = _scrapes()
    shown = figures(new, {}, span_s=0.0)
    assert shown["throughput"]["requests_per_s"] is None
    assert shown["latency_ms"]["basis"] == "window"  # every observation is newer than nothing
    shown = figures(new, new, span_s=10.0)
    assert shown["throughput"]["requests_per_s"] == 0.0
    assert shown["latency_ms"]["basis"] == "since start"
    assert shown["latency_ms"]["p50"] is not None


def test_tenant_labels_are_bounded():
    label = BoundedLabels(2)
    assert [label(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER_TENANTS, "a", OTHER_TENANTS, "b"]
    assert BoundedLabels(0)("a") == OTHER_TENANTS
