"""Per-tenant limits per minute on a real redis-server, shared by every router."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from redis.asyncio import Redis

from schemas import Status, TenantLimits
from services.router.limits import WINDOW_S, TenantLimiter

pytestmark = pytest.mark.integration


async def clear_of_window_edge(margin_s: float = 5) -> None:
    """Wait out the end of a minute window, so one test's requests share one window."""
    left = WINDOW_S - time.time() % WINDOW_S
    if left < margin_s:
        await asyncio.sleep(left + 0.1)


async def test_two_routers_share_a_tenants_request_and_token_budget(redis_url):
    await clear_of_window_edge()
    a, b = Redis.from_url(redis_url), Redis.from_url(redis_url)
    tenant = f"lim-{uuid.uuid4().hex[:6]}"
    limits = TenantLimits(requests_per_minute=3, tokens_per_minute=1000)
    first, second = TenantLimiter(a), TenantLimiter(b)
    try:
        assert await first.check([(tenant, 100, limits), (tenant, 100, limits)]) == [None, None]
        (refused_tokens,) = await second.check([(tenant, 900, limits)])
        assert refused_tokens is not None and "tokens per minute" in refused_tokens.message
        assert 0 < refused_tokens.retry_after_ms <= WINDOW_S * 1000
        assert await second.check([(tenant, 100, limits)]) == [None]  # refusals are not counted
        (refused_count,) = await first.check([(tenant, 1, limits)])
        assert "3 requests per minute" in refused_count.message and refused_count.retriable
        (never,) = await first.check([(f"{tenant}-big", 5000, limits)])
        assert not never.retriable and "may use 1000 a minute" in never.message
        assert await first.check([(tenant, 10**9, TenantLimits())]) == [None]  # unlimited
    finally:
        await a.aclose()
        await b.aclose()


async def test_without_redis_every_request_is_admitted():
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    limiter = TenantLimiter(dead)
    assert await limiter.check([("t", 10, TenantLimits(requests_per_minute=1))] * 3) == [None] * 3
    assert limiter.degraded
    await dead.aclose()


async def test_over_the_limit_the_router_answers_rate_limited_with_a_retry_after(worker, router, client):
    await clear_of_window_edge(15)
    # The policy gives tenant 'limited' 2 requests a minute; the limits are per tenant, so use
    # a fresh window's worth: every run of this test is in a minute of its own or shares it.
    results = []
    for i in range(3):
        results.append(await client.complete(tenant="limited", route="short", prompt=f"limit {uuid.uuid4().hex} {i}"))
    limited = [r for r in results if r.status == Status.rejected]
    assert limited, "three requests in one minute went through a limit of two"
    assert limited[-1].error.code == "rate_limited" and limited[-1].error.retriable
    assert limited[-1].error.retry_after_ms > 0
