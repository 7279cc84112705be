"""One path through every service on real parts: client → broker → router → vLLM worker → reply, and costs → ClickHouse."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from aiokafka.structs import TopicPartition
from redis.asyncio import Redis

from schemas import DeadLetter, InferenceRequest, InferenceResult, Status
from services.router.seen import ForwardedLog
from shared import kafka
from shared.codec import decode, encode
from shared.topics import request_key
from tests.integration.conftest import wait_for_rows

pytestmark = pytest.mark.integration

SYSTEM = {"role": "system", "content": "You answer questions about rivers, mountains and the sea."}


def tenants(n: int) -> list[str]:
    run = uuid.uuid4().hex[:6]
    return [f"t{run}-{i}" for i in range(n)]


async def test_requests_for_several_tenants_are_answered_and_booked_exactly_once(worker, router, sink, client,
                                                                                  store, policies):
    names = tenants(3)
    n = 36
    plan = [(names[i % 3], "chat" if i % 2 else "short") for i in range(n)]
    results = await asyncio.gather(*(
        client.complete(tenant=tenant, route=route, max_tokens=64,
                        messages=[SYSTEM, {"role": "user", "content": f"question {i}: how long is the river?"}])
        for i, (tenant, route) in enumerate(plan)
    ))

    assert [r.tenant for r in results] == [t for t, _ in plan]
    assert len({r.request_id for r in results}) == n
    for result, (_, route) in zip(results, plan):
        assert result.status == Status.ok, result.error
        assert result.output and result.tokens_out > 0 and result.tokens_in > 0
        assert result.model == "small"
        assert result.tokens_out <= policies.routes[route].max_output_tokens  # capped by the route, not the caller

    params = {"tenants": names}
    books = await wait_for_rows(store, "tenant IN {tenants:Array(String)}", n, params)
    assert books["records"] == n
    assert books["tokens_in"] == sum(r.tokens_in for r in results)
    assert books["tokens_out"] == sum(r.tokens_out for r in results)
    price = policies.models["small"].price
    assert books["cost_nano_usd"] == sum(price.cost_nano_usd(r.tokens_in, r.tokens_out) for r in results)
    per_tenant = store.query(
        "SELECT tenant, sum(requests) AS requests FROM switchyard.cost_by_hour "
        "WHERE tenant IN {tenants:Array(String)} GROUP BY tenant ORDER BY tenant", params)
    assert [(row["tenant"], row["requests"]) for row in per_tenant] == [(t, plan.count((t, "chat")) + plan.count((t, "short"))) for t in names]


async def test_a_conversation_reuses_its_kv_cache(worker, router, sink, client):
    (tenant,) = tenants(1)
    history = [{"role": "system", "content": "You are a patient guide to the sea. " * 20}]
    first = await client.complete(tenant=tenant, route="chat", messages=history + [{"role": "user", "content": "first"}])
    # The next turn: the conversation so far, and a new question.
    second = await client.complete(tenant=tenant, route="chat", messages=history + [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": first.output},
        {"role": "user", "content": "second"}])
    assert first.status == second.status == Status.ok
    # vLLM reuses whole 16-token blocks of what the first turn left.
    assert second.cached_tokens >= 16


async def test_unknown_route_gets_a_clear_rejection_and_a_cost_record(router, sink, client, store):
    (tenant,) = tenants(1)
    result = await client.complete(tenant=tenant, route="no-such-route", prompt="hello")
    assert result.status == Status.rejected
    assert result.error.code == "unknown_route" and "no-such-route" in result.error.message
    books = await wait_for_rows(store, "tenant = {t:String}", 1, {"t": tenant})
    assert books["records"] == 1 and books["cost_nano_usd"] == 0


async def test_a_passed_deadline_is_answered_expired_without_running(router, sink, client, store):
    (tenant,) = tenants(1)
    result = await client.complete(tenant=tenant, route="chat", prompt="hello", deadline_unix_ms=1)
    assert result.status == Status.expired and result.tokens_out == 0
    books = await wait_for_rows(store, "tenant = {t:String}", 1, {"t": tenant})
    assert books["records"] == 1 and books["cost_nano_usd"] == 0


async def test_bad_messages_are_dead_lettered_and_the_router_keeps_routing(worker, router, client, broker, topics):
    producer = kafka.producer(broker)
    await producer.start()
    dead = kafka.consumer(broker, group_id=None, auto_offset_reset="latest")
    await dead.start()
    tp = TopicPartition(topics.dead_letter, 0)
    dead.assign([tp])
    await dead.seek_to_end(tp)
    await dead.position(tp)
    addressed_id = uuid.uuid4().hex
    try:
        standard = topics.requests("standard")
        await producer.send_and_wait(standard, b"\x00 this is not json", key=b"x")
        await producer.send_and_wait(standard, orjson.dumps({"id": addressed_id, "reply_to": client.reply_to,
                                                             "route": "chat", "prompt": "no tenant"}), key=b"chat")
        letters: list[DeadLetter] = []
        while len(letters) < 2:
            batch = await asyncio.wait_for(dead.getmany(timeout_ms=1000), 30)
            letters += [decode(DeadLetter, r.value) for recs in batch.values() for r in recs]
    finally:
        await dead.stop()
        await producer.stop()

    # Different keys, different partitions: the two letters may come in either order.
    (not_json,) = [letter for letter in letters if "not valid JSON" in letter.reason]
    (invalid,) = [letter for letter in letters if addressed_id in letter.payload]
    assert not_json.reason_code == "undecodable"
    assert not_json.source_topic == standard and not_json.payload_bytes == len(b"\x00 this is not json")
    assert invalid.reason_code == "undecodable" and "tenant: Field required" in invalid.reason
    # ...and the router is still routing.
    ok = await client.complete(tenant="after-poison", route="chat", prompt="still there?")
    assert ok.status == Status.ok


async def test_an_invalid_request_that_names_its_sender_gets_an_error_reply(router, client, broker, topics):
    request_id = uuid.uuid4().hex
    fut = client.track(request_id)
    producer = kafka.producer(broker)
    await producer.start()
    try:
        await producer.send_and_wait(topics.requests("standard"), orjson.dumps(
            {"id": request_id, "reply_to": client.reply_to, "tenant": "acme", "route": "chat",
             "prompt": "x", "sampling": {"max_tokens": -5}}), key=b"chat")
    finally:
        await producer.stop()
    reply: InferenceResult = await asyncio.wait_for(fut, 30)
    assert reply.status == Status.rejected
    assert reply.error.code == "undecodable" and "sampling.max_tokens" in reply.error.message


async def test_a_redelivered_request_runs_and_bills_once(worker, router, sink, client, broker, topics, store):
    (tenant,) = tenants(1)
    request = InferenceRequest(tenant=tenant, route="chat", prompt="once only", reply_to=client.reply_to)
    producer = kafka.producer(broker)
    await producer.start()

    async def send_copies(n: int) -> None:
        for _ in range(n):
            await producer.send_and_wait(topics.requests("standard"), encode(request), key=request_key("chat"))

    try:
        first = client.track(request.id)
        await send_copies(1)
        assert (await asyncio.wait_for(first, 60)).status == Status.ok
        # The same bytes again, in a later batch (what a restarted router re-reads) and twice
        # in one batch: the forwarded log in Redis and the batch itself must both catch them.
        again = client.track(request.id)
        await send_copies(2)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(again), 3)
    finally:
        await producer.stop()
    books = await wait_for_rows(store, "tenant = {t:String}", 1, {"t": tenant})
    assert books["records"] == 1
    assert router.counts["redelivered"] >= 2


@pytest.mark.parametrize("route", ["chat", "cached"])
async def test_a_request_answered_before_the_router_recorded_it_is_not_answered_again(
        route, worker, router, sink, client, broker, topics, store, redis_url):
    """A router killed after forwarding a request but before writing it to the forwarded log reads it
    again once restarted; by then its answer may be in the idempotency record ("chat") or the exact
    cache ("cached"). That answer is this request's own: its sender has it, and it is booked."""
    (tenant,) = tenants(1)
    request = InferenceRequest(tenant=tenant, route=route, prompt="answered before the router knew",
                               reply_to=client.reply_to)
    producer = kafka.producer(broker)
    await producer.start()
    redis = Redis.from_url(redis_url)
    try:
        first = client.track(request.id)
        await producer.send_and_wait(topics.requests("standard"), encode(request), key=request_key(route))
        assert (await asyncio.wait_for(first, 60)).status == Status.ok
        # What a router that died before recording the forwarding left behind.
        assert await redis.delete(ForwardedLog.key(tenant, request.id)) == 1
        redelivered = router.counts["redelivered"]
        again = client.track(request.id)
        await producer.send_and_wait(topics.requests("standard"), encode(request), key=request_key(route))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(again), 5)
        assert router.counts["redelivered"] == redelivered + 1
    finally:
        await producer.stop()
        await redis.aclose()
    await wait_for_rows(store, "tenant = {t:String}", 1, {"t": tenant})
    # The sink books on a 0.2 s timer: a second record, were there one, would be in by now.
    books = await wait_for_rows(store, "tenant = {t:String}", 2, {"t": tenant}, timeout_s=3)
    assert books["records"] == 1


async def test_a_reused_request_id_with_different_content_is_refused(worker, router, client):
    (tenant,) = tenants(1)
    request_id = uuid.uuid4().hex
    first = await client.complete(tenant=tenant, route="short", prompt="first", id=request_id)
    assert first.status == Status.ok
    second = await client.complete(tenant=tenant, route="short", prompt="something else", id=request_id)
    assert second.status == Status.rejected and second.error.code == "duplicate_request_id"
