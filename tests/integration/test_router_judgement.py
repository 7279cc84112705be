"""The router's judgement and memory on real parts: tiers from the trained classifier, repeats
answered once, exact and semantic caches, each with the books it leaves."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import pytest
from aiokafka.structs import TopicPartition

from schemas import CacheHit, InferenceRequest, ModelHealth, RoutedRequest, Status
from shared import kafka
from shared.codec import decode, encode
from shared.topics import request_key
from tests.integration.conftest import wait_for_rows

pytestmark = pytest.mark.integration


def tenant() -> str:
    return f"j{uuid.uuid4().hex[:8]}"


async def forwarded_to(broker, topics, model: str, requests: list[InferenceRequest]) -> dict[str, RoutedRequest]:
    """Send raw requests and read what the router forwards to `model`'s topic (no worker serves it)."""
    topic = topics.model(model)
    reader = kafka.consumer(broker, group_id=None, auto_offset_reset="earliest")
    await reader.start()
    producer = kafka.producer(broker)
    await producer.start()
    wanted = {r.id for r in requests}
    found: dict[str, RoutedRequest] = {}
    try:
        partitions = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or []]
        if not partitions:
            await reader.stop()
            reader = kafka.consumer(broker, topic, group_id=None, auto_offset_reset="earliest")
            await reader.start()
        else:
            reader.assign(partitions)
        for r in requests:
            await producer.send_and_wait(topics.requests(r.priority), encode(r), key=request_key(r.route))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while wanted - found.keys() and loop.time() < deadline:
            batch = await reader.getmany(timeout_ms=500)
            for recs in batch.values():
                for rec in recs:
                    routed = decode(RoutedRequest, rec.value)
                    if routed.request.id in wanted:
                        found[routed.request.id] = routed
    finally:
        await producer.stop()
        await reader.stop()
    return found


async def test_hard_requests_go_to_the_large_tier_with_their_reasons(worker, router, client, broker, topics):
    who = tenant()
    code = InferenceRequest(tenant=who, route="tiered", reply_to=client.reply_to,
                            prompt="Why does this crash?\n```python\nitems = {}\nprint(items['a'])\n```")
    subtle = InferenceRequest(tenant=who, route="tiered", reply_to=client.reply_to, prompt=(
        "We run two warehouses that ship to forty stores. Warehouse A has cheaper labour but is further from "
        "most stores, and fuel prices have risen by a third this year. How should we split next quarter's "
        "orders between them, and what would change your recommendation?"))
    routed = await forwarded_to(broker, topics, "large", [code, subtle])
    assert routed[code.id].tier == "large" and routed[code.id].reasons[0] == "rule: code"
    assert routed[subtle.id].reasons[0].startswith("classifier: p(hard)=")
    assert routed[code.id].fallbacks == [] and routed[code.id].model == "large"

    # A simple one goes to the small tier, and the tier and reasons come back on the result.
    easy = await client.complete(tenant=who, route="tiered", prompt="What is the capital of Peru?")
    assert easy.status == Status.ok and easy.model == "small" and easy.tier == "small"
    assert easy.route_reasons[0].startswith("classifier: p(hard)=")
    assert easy.route_reasons[-1].startswith("cheapest capable model")


async def test_a_repeat_runs_once_and_is_billed_once(worker, router, sink, client, store):
    who = tenant()
    ask = dict(tenant=who, route="chat", prompt="Name a river in Spain.", max_tokens=8)
    # Two at once: one runs, the other waits for it; a third after both gets the stored result.
    a, b = await asyncio.gather(client.complete(**ask), client.complete(**ask))
    c = await client.complete(**ask)
    first, repeat = (a, b) if b.cache_hit == CacheHit.idempotent else (b, a)
    assert first.cache_hit == CacheHit.none and first.status == Status.ok and first.tokens_out > 0
    assert repeat.cache_hit == CacheHit.idempotent and repeat.replay_of == first.request_id
    assert c.cache_hit == CacheHit.idempotent and c.replay_of == first.request_id
    assert repeat.output == first.output == c.output
    # The caller's idempotency key makes requests the same even when their content differs.
    key = uuid.uuid4().hex
    k1 = await client.complete(tenant=who, route="chat", prompt="Name a lake.", idempotency_key=key, max_tokens=8)
    k2 = await client.complete(tenant=who, route="chat", prompt="Name a lake!", idempotency_key=key, max_tokens=8)
    assert k1.cache_hit == CacheHit.none and k2.cache_hit == CacheHit.idempotent and k2.output == k1.output

    books = await wait_for_rows(store, "tenant = {t:String}", 5, {"t": who})
    assert books["records"] == 5
    runs = store.query("SELECT request_id, model, cost_nano_usd, cache_hit FROM switchyard.cost_records FINAL "
                       "WHERE tenant = {t:String} AND cost_nano_usd > 0 ORDER BY request_id", {"t": who})
    assert sorted(r["request_id"] for r in runs) == sorted([first.request_id, k1.request_id])
    assert books["cost_nano_usd"] == sum(r["cost_nano_usd"] for r in runs)


async def test_the_exact_cache_answers_the_same_tenant_and_not_another(worker, router, sink, client, store):
    me, other = tenant(), tenant()
    ask = dict(route="cached", prompt="Spell 'harbour' backwards.", max_tokens=8, temperature=0.0)
    miss = await client.complete(tenant=me, **ask)
    await asyncio.sleep(0.2)  # the worker stores the entry just after its reply
    hit = await client.complete(tenant=me, **ask)
    elsewhere = await client.complete(tenant=other, **ask)
    assert miss.cache_hit == CacheHit.none and hit.cache_hit in (CacheHit.exact, CacheHit.idempotent)
    assert hit.output == miss.output and hit.replay_of == miss.request_id
    assert elsewhere.cache_hit == CacheHit.none and elsewhere.replay_of is None

    # On a route that shares its cache, another tenant's identical request is a hit.
    shared = dict(route="shared-cache", prompt=f"Shared {uuid.uuid4().hex}", max_tokens=8)
    first = await client.complete(tenant=me, **shared)
    await asyncio.sleep(0.2)
    theirs = await client.complete(tenant=other, **shared)
    assert theirs.cache_hit == CacheHit.exact and theirs.output == first.output

    books = await wait_for_rows(store, "tenant IN {ts:Array(String)} AND cache_hit = 'exact'", 1,
                                {"ts": [me, other]})
    assert books["cost_nano_usd"] == 0 and books["tokens_in"] == 0


async def test_the_semantic_cache_matches_meaning_within_a_tenant_and_whole_conversations(worker, router, sink,
                                                                                           client, store):
    me, other = tenant(), tenant()
    first = await client.complete(tenant=me, route="cached", prompt="What is the capital of France?", max_tokens=8)
    assert first.cache_hit == CacheHit.none
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while router._semantic.size(f"cached:{me}:minilm") == 0 and loop.time() < deadline:
        await asyncio.sleep(0.1)
    close = await client.complete(tenant=me, route="cached", prompt="what's the capital city of France?", max_tokens=8)
    assert close.cache_hit == CacheHit.semantic and close.output == first.output
    assert close.replay_of == first.request_id
    # Another tenant, another question, or the same question after another conversation: no hit.
    assert (await client.complete(tenant=other, route="cached", prompt="What is the capital of France?",
                                  max_tokens=8)).cache_hit == CacheHit.none
    assert (await client.complete(tenant=me, route="cached", prompt="What is the capital of Peru?",
                                  max_tokens=8)).cache_hit == CacheHit.none
    history = [{"role": "system", "content": "You answer questions about cooking."},
               {"role": "user", "content": "I burned the onions."},
               {"role": "assistant", "content": "Sorry to hear that."},
               {"role": "user", "content": "What is the capital of France?"}]
    assert (await client.complete(tenant=me, route="cached", messages=history,
                                  max_tokens=8)).cache_hit == CacheHit.none
    books = await wait_for_rows(store, "tenant = {t:String} AND cache_hit = 'semantic'", 1, {"t": me})
    assert books["records"] == 1 and books["cost_nano_usd"] == 0


async def test_a_static_embedder_cache_serves_paraphrases_and_its_guard_refuses_a_swap(worker, router, sink, client,
                                                                                      store, static_embedder):
    me = tenant()
    loop = asyncio.get_running_loop()

    async def indexed(count: int) -> None:
        deadline = loop.time() + 10
        while router._semantic.size(f"fast-cached:{me}:static") < count and loop.time() < deadline:
            await asyncio.sleep(0.1)

    first = await client.complete(tenant=me, route="fast-cached", prompt="How do I reset my password?", max_tokens=8)
    assert first.cache_hit == CacheHit.none
    await indexed(1)
    close = await client.complete(tenant=me, route="fast-cached", prompt="How can I reset my password?", max_tokens=8)
    assert close.cache_hit == CacheHit.semantic and close.output == first.output and close.replay_of == first.request_id

    # To the static embedder these two are the same bag of words (cosine 1.0, over the route's 0.9);
    # the guard signature (USD before EUR) tells them apart.
    there, back = "Convert 100 USD to EUR", "Convert 100 EUR to USD"
    assert float(static_embedder.embed([there])[0] @ static_embedder.embed([back])[0]) > 0.9
    assert (await client.complete(tenant=me, route="fast-cached", prompt=there, max_tokens=8)).cache_hit == CacheHit.none
    await indexed(2)
    assert (await client.complete(tenant=me, route="fast-cached", prompt=back, max_tokens=8)).cache_hit == CacheHit.none
    books = await wait_for_rows(store, "tenant = {t:String} AND cache_hit = 'semantic'", 1, {"t": me})
    assert books["records"] == 1 and books["cost_nano_usd"] == 0


async def test_workers_report_health_and_the_router_skips_an_unhealthy_model(worker, router, client, broker, topics):
    who = tenant()
    # The real worker reports what it ran.
    assert (await client.complete(tenant=who, route="chat", prompt="Name a fish.", max_tokens=4)).status == Status.ok
    reader = kafka.consumer(broker, topics.health, group_id=None, auto_offset_reset="earliest")
    await reader.start()
    try:
        seen: ModelHealth | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline and not (seen and seen.requests >= 1):
            for recs in (await reader.getmany(timeout_ms=500)).values():
                for rec in recs:
                    report = decode(ModelHealth, rec.value)
                    if report.model == "small" and report.worker != "drill":
                        seen = report
    finally:
        await reader.stop()
    assert seen is not None and seen.requests >= 1 and seen.capacity >= 1 and seen.p95_latency_ms is not None

    # A report that small is failing: the router skips it for the next model of the chain.
    producer = kafka.producer(broker)
    await producer.start()

    async def drill(errors: int) -> None:
        report = ModelHealth(model="small", worker="drill", ts_ms=int(time.time() * 1000), interval_s=30,
                             window_s=60, requests=1000, errors=errors, in_flight=0, capacity=1, backlog=0)
        await producer.send_and_wait(topics.health, encode(report), key=b"small")

    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while "small" not in router.health.unhealthy(router.policies) and loop.time() < deadline:
            await drill(errors=1000)
            await asyncio.sleep(0.5)
        easy = InferenceRequest(tenant=who, route="tiered", reply_to=client.reply_to, prompt="What is the capital of Chile?")
        routed = (await forwarded_to(broker, topics, "large", [easy]))[easy.id]
        # The drill's 1000 failures, with the real worker's recent successes counted in.
        rates = [int(m.group(1)) for r in routed.reasons
                 if (m := re.fullmatch(r"skipped small: error rate (\d+)% is over 50%", r))]
        assert rates and rates[0] > 50, routed.reasons
        assert routed.reasons[0].startswith("classifier") and routed.model == "large"
    finally:
        await drill(errors=0)  # healthy again, for the tests after this one
        while "small" in router.health.unhealthy(router.policies):
            await asyncio.sleep(0.2)
        await producer.stop()
    again = await client.complete(tenant=who, route="tiered", prompt="What is the capital of Chile?", max_tokens=4)
    assert again.model == "small"
