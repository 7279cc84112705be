"""The router's one Redis call per batch, on a real redis-server: each step gives the answer the
module that owns it gives on its own, in order within the batch."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis

from schemas import InferenceRequest, InferenceResult, Memo, ModelPrice, RoutedRequest, TenantLimits
from services.router.gate import Ask, Gate
from services.router.limits import TenantLimiter
from services.router.seen import ForwardedLog
from shared.memory import Memory, exact_key, idempotency_key
from tests.integration.test_limits import clear_of_window_edge

pytestmark = pytest.mark.integration


def request(tenant: str, prompt: str = "same question", **fields) -> InferenceRequest:
    return InferenceRequest(tenant=tenant, route="chat", reply_to="svc", prompt=prompt, **fields)


def gate_on(redis: Redis) -> tuple[Gate, ForwardedLog, TenantLimiter, Memory]:
    forwarded, limiter, memory = ForwardedLog(redis), TenantLimiter(redis), Memory(redis)
    return Gate(forwarded, limiter, memory), forwarded, limiter, memory


async def test_redeliveries_reused_ids_and_the_routers_own_answers(redis_url):
    redis = Redis.from_url(redis_url)
    gate, forwarded, _, _ = gate_on(redis)
    tenant = f"gate-{uuid.uuid4().hex[:6]}"
    sent, reused, expired = request(tenant, "a"), request(tenant, "b"), request(tenant, "c")
    await forwarded.record([(tenant, sent.id, "d1"), (tenant, reused.id, "d2")])
    try:
        passages = await gate.check([
            Ask(sent, "d1", claim_window_s=60),
            Ask(reused, "other", claim_window_s=60),
            Ask(expired, "d3", go_on=False),
        ])
        assert [p.state for p in passages] == ["redelivered", "conflict", "final"]
        # Nothing past the redelivery check ran: the first two were not claimed.
        assert await redis.get(idempotency_key(sent)) is None
        assert await redis.get(idempotency_key(reused)) is None
    finally:
        await redis.aclose()


async def test_limits_count_in_order_and_refusals_go_no_further(redis_url):
    await clear_of_window_edge()
    redis = Redis.from_url(redis_url)
    gate, _, limiter, _ = gate_on(redis)
    tenant = f"gate-{uuid.uuid4().hex[:6]}"
    limits = TenantLimits(requests_per_minute=2, tokens_per_minute=1000)
    first, second, third, big = (request(tenant, f"q{i}") for i in range(4))
    try:
        passages = await gate.check([
            Ask(first, "d1", tokens=100, limits=limits, claim_window_s=60),
            Ask(big, "d4", tokens=5000, limits=limits, claim_window_s=60),
            Ask(second, "d2", tokens=100, limits=limits, claim_window_s=60),
            Ask(third, "d3", tokens=100, limits=limits, claim_window_s=60),
        ])
        assert [p.state for p in passages] == ["claimed", "limited", "claimed", "limited"]
        assert not passages[1].refusal.retriable and "may use 1000 a minute" in passages[1].refusal.message
        assert passages[3].refusal.retriable and "2 requests per minute" in passages[3].refusal.message
        assert await redis.get(idempotency_key(third)) is None  # refused: not claimed
        # The counts are the limiter's own: it refuses the next one too.
        (refusal,) = await limiter.check([(tenant, 1, limits)])
        assert refusal is not None
    finally:
        await redis.aclose()


async def test_exact_hits_answer_repeats_wait_and_finished_ones_replay(redis_url):
    redis = Redis.from_url(redis_url)
    gate, _, _, memory = gate_on(redis)
    tenant = f"gate-{uuid.uuid4().hex[:6]}"
    cached, first, repeat, other = (request(tenant, "cached"), request(tenant, "run me"),
                                    request(tenant, "run me"), request(tenant, "no window"))
    key = exact_key(f"chat:{tenant}", "digest")
    stored = InferenceResult(request_id="earlier", tenant=tenant, route="chat", status="ok", output="42")
    await redis.set(key, stored.model_dump_json(), ex=60)
    try:
        passages = await gate.check([
            Ask(cached, "d1", exact_key=key, claim_window_s=60),
            Ask(first, "d2", exact_key=exact_key(f"chat:{tenant}", "missing"), claim_window_s=60),
            Ask(repeat, "d3", claim_window_s=60),
            Ask(other, "d4"),
        ])
        assert [p.state for p in passages] == ["exact", "claimed", "waiting", "open"]
        assert passages[0].hit.output == "42" and passages[0].hit.request_id == "earlier"
        assert await redis.get(idempotency_key(cached)) is None  # answered from cache: not claimed
        assert passages[2].claim.first_id == first.id

        routed = RoutedRequest(request=first, model="small", policy_version="1", received_at_ms=0,
                               price=ModelPrice(in_nano_usd_per_token=1, out_nano_usd_per_token=1),
                               memo=Memo(idempotency_key=idempotency_key(first), window_s=60))
        done = InferenceResult(request_id=first.id, tenant=tenant, route="chat", status="ok", output="ran")
        assert [w.id for w in await memory.complete(routed, done)] == [repeat.id]
        later = request(tenant, "run me")
        (passage,) = await gate.check([Ask(later, "d5", claim_window_s=60)])
        assert passage.state == "done" and passage.claim.first.output == "ran"
    finally:
        await redis.aclose()


async def test_without_redis_every_request_goes_on_and_each_part_says_so():
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    gate, forwarded, limiter, memory = gate_on(dead)
    tenant = "gate-dead"
    passages = await gate.check([
        Ask(request(tenant, "a"), "d1", tokens=10, limits=TenantLimits(requests_per_minute=1), claim_window_s=60),
        Ask(request(tenant, "b"), "d2"),
        Ask(request(tenant, "c"), "d3", go_on=False),
    ])
    assert [p.state for p in passages] == ["claimed", "open", "final"]
    assert forwarded.degraded and limiter.degraded and memory.degraded
    await dead.aclose()
