"""Tenant isolation on real parts: one tenant tries to reach another's answers through the router by
reusing what it can choose itself (the idempotency key, the content, the request id) and must get
its own request run, answered and billed. The caches' isolation is tried in test_router_judgement
(exact and semantic caches: another tenant's identical request is a miss)."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from schemas import CacheHit, InferenceResult, StreamDelta, Status
from shared.client import Client
from tests.integration.conftest import wait_for_rows
from tests.integration.test_fuzz_router import read_until, tail

pytestmark = pytest.mark.integration


def tenant() -> str:
    return f"iso{uuid.uuid4().hex[:8]}"


def runs_of(store, who: str) -> list[dict]:
    return store.query("SELECT request_id, tokens_out, cost_nano_usd, cache_hit FROM switchyard.cost_records FINAL "
                       "WHERE tenant = {t:String}", {"t": who})


async def test_another_tenants_idempotency_key_or_content_gets_its_own_run(worker, router, sink, client, store):
    me, other = tenant(), tenant()
    key = uuid.uuid4().hex
    mine = await client.complete(tenant=me, route="chat", prompt="Name a harbour.", idempotency_key=key, max_tokens=8)
    # The same key from another tenant, after the first has its result: a stranger's key, not a repeat.
    theirs = await client.complete(tenant=other, route="chat", prompt="Name a mountain.", idempotency_key=key,
                                   max_tokens=8)
    assert mine.status == theirs.status == Status.ok
    assert theirs.cache_hit == CacheHit.none and theirs.replay_of is None and theirs.tenant == other

    # The same content from two tenants at once: neither waits for the other's run.
    ask = dict(route="chat", prompt=f"Name a river {uuid.uuid4().hex[:6]}.", max_tokens=8)
    a, b = await asyncio.gather(client.complete(tenant=me, **ask), client.complete(tenant=other, **ask))
    assert a.cache_hit == b.cache_hit == CacheHit.none and a.replay_of is None and b.replay_of is None
    assert (a.tenant, b.tenant) == (me, other)

    # Each tenant paid for its own two runs; nothing of one is booked to the other.
    await wait_for_rows(store, "tenant = {t:String}", 2, {"t": other})
    for who, ids in ((me, {mine.request_id, a.request_id}), (other, {theirs.request_id, b.request_id})):
        rows = runs_of(store, who)
        assert {r["request_id"] for r in rows} == ids
        assert all(r["cache_hit"] == "none" and r["tokens_out"] > 0 and r["cost_nano_usd"] > 0 for r in rows)


async def test_a_request_id_another_tenant_used_runs_anew_and_answers_only_its_sender(worker, router, sink, client,
                                                                                     store):
    """Request ids are the producers': before the worker's record of outcomes was kept per tenant, a
    second tenant reusing an id got the first tenant's recorded result sent again, and on a shared
    reply topic (a service serving several tenants) read it as its own answer."""
    me, other = tenant(), tenant()
    shared_id = uuid.uuid4().hex
    mine = await client.complete(tenant=me, route="chat", id=shared_id, prompt="Tell me a secret.",
                                 temperature=1.0, max_tokens=16)
    theirs = await client.complete(tenant=other, route="chat", id=shared_id, prompt="Tell me a joke.",
                                   temperature=1.0, max_tokens=16, timeout_s=60)
    assert mine.status == theirs.status == Status.ok
    assert theirs.tenant == other and theirs.cache_hit == CacheHit.none and theirs.replay_of is None
    # Sampled at temperature 1 from random weights: a replay would be the only way to the same text.
    assert theirs.output != mine.output
    await wait_for_rows(store, "tenant = {t:String}", 1, {"t": other})
    (booked,) = runs_of(store, other)
    assert booked["request_id"] == shared_id and booked["tokens_out"] == theirs.tokens_out > 0


async def test_streamed_text_goes_to_its_own_tenants_reply_topic_only(worker, router, broker, topics, client):
    me, other = tenant(), tenant()
    shared_id = uuid.uuid4().hex
    ask = dict(route="chat", prompt="Describe the sea.", max_tokens=16, temperature=1.0, id=shared_id)
    mine = [piece async for piece in client.stream(tenant=me, **ask)]
    assert isinstance(mine[-1], InferenceResult) and mine[-1].status == Status.ok and len(mine) > 1

    # The other tenant streams the same content under the same id to a reply topic of its own.
    async with Client(broker, reply_to=f"test-{uuid.uuid4().hex[:8]}", topics=topics, timeout_s=60) as theirs:
        pieces = [piece async for piece in theirs.stream(tenant=other, **ask)]
    result, deltas = pieces[-1], pieces[:-1]
    assert isinstance(result, InferenceResult) and result.tenant == other and result.replay_of is None
    assert deltas and all(isinstance(d, StreamDelta) and d.request_id == shared_id for d in deltas)
    assert "".join(d.text for d in deltas) == result.output != mine[-1].output

    # The first tenant's reply topic, read whole: its own deltas and its one result, nothing more.
    watch = await tail(broker, topics.replies(client.reply_to), from_start=True)
    records: list = []
    try:
        await read_until(watch, records, lambda: False, 5)  # all of it (Tansu's end offsets can lag)
    finally:
        await watch.stop()
    seen = [orjson.loads(r.value) for r in records]
    results = [m for m in seen if m["kind"] == "result"]
    assert [(m["request_id"], m["tenant"]) for m in results] == [(shared_id, me)]
    assert sorted(m["seq"] for m in seen if m["kind"] == "delta") == list(range(len(mine) - 1))
