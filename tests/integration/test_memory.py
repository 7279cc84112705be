"""Idempotency claims and completions against a real redis-server: the Lua scripts' guarantees."""

import asyncio

import pytest
from redis.asyncio import Redis

from schemas import InferenceRequest, InferenceResult, Memo, ModelPrice, RoutedRequest
from shared.memory import Memory, idempotency_key

pytestmark = pytest.mark.integration


def request(tenant, prompt="same question", **fields):
    return InferenceRequest(tenant=tenant, route="chat", reply_to="svc", prompt=prompt, **fields)


def routed(req):
    return RoutedRequest(request=req, model="small", price=ModelPrice(in_nano_usd_per_token=1, out_nano_usd_per_token=1),
                         policy_version="1", received_at_ms=0,
                         memo=Memo(idempotency_key=idempotency_key(req), window_s=60))


def result(req, status="ok"):
    return InferenceResult(request_id=req.id, tenant=req.tenant, route=req.route, status=status, output="42")


async def test_first_claims_repeats_wait_then_get_the_first_result(redis_url):
    redis = Redis.from_url(redis_url)
    memory = Memory(redis)
    first, second, third = (request("idem-a") for _ in range(3))
    assert [c.state for c in await memory.claim([(first, 60)])] == ["claimed"]
    # The same request claimed again (a redelivery) is still the claimant, not a waiter.
    assert [c.state for c in await memory.claim([(first, 60)])] == ["claimed"]
    waiting = await memory.claim([(second, 60), (third, 60)])
    assert [(c.state, c.first_id) for c in waiting] == [("waiting", first.id)] * 2

    waiters = await memory.complete(routed(first), result(first))
    assert [w.id for w in waiters] == [second.id, third.id]
    # Until they are marked answered, a second completion (a redelivered first) sees them again.
    assert [w.id for w in await memory.complete(routed(first), result(first))] == [second.id, third.id]
    await memory.answered(routed(first), 2)
    assert await memory.complete(routed(first), result(first)) == []

    fourth = request("idem-a")
    (done,) = await memory.claim([(fourth, 60)])
    assert done.state == "done" and done.first.request_id == first.id and done.first.output == "42"
    # Another tenant with the same content is a different request.
    assert (await memory.claim([(request("idem-b"), 60)]))[0].state == "claimed"
    await redis.aclose()


async def test_a_failed_first_run_is_not_kept_so_the_next_repeat_runs(redis_url):
    redis = Redis.from_url(redis_url)
    memory = Memory(redis)
    first, second = request("idem-f"), request("idem-f")
    await memory.claim([(first, 60)])
    await memory.claim([(second, 60)])
    waiters = await memory.complete(routed(first), result(first, status="failed"))
    assert [w.id for w in waiters] == [second.id]
    await memory.answered(routed(first), 1)
    assert (await memory.claim([(request("idem-f"), 60)]))[0].state == "claimed"
    await redis.aclose()


async def test_an_explicit_key_beats_content_and_concurrent_claims_have_one_winner(redis_url):
    redis = Redis.from_url(redis_url)
    memory = Memory(redis)
    a = request("idem-k", prompt="one wording", idempotency_key="order-17")
    b = request("idem-k", prompt="another wording", idempotency_key="order-17")
    assert (await memory.claim([(a, 60)]))[0].state == "claimed"
    assert (await memory.claim([(b, 60)]))[0].state == "waiting"

    racers = [request("idem-race") for _ in range(20)]
    claims = await asyncio.gather(*(Memory(redis).claim([(r, 60)]) for r in racers))
    assert sorted(c[0].state for c in claims) == ["claimed"] + ["waiting"] * 19
    await redis.aclose()


async def test_without_redis_everything_runs(redis_url):
    redis = Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5)
    memory = Memory(redis)
    assert [c.state for c in await memory.claim([(request("idem-x"), 60)])] == ["claimed"]
    assert memory.degraded
    await redis.aclose()
