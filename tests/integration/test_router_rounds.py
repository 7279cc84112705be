"""The router routes the next rounds while earlier rounds' answers travel to the broker. When a
round's sends fail, it and every round after it are read again: each request is still forwarded
exactly once, and the offsets end committed past all of them."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.errors import RequestTimedOutError
from aiokafka.structs import TopicPartition
from redis.asyncio import Redis

from schemas import InferenceRequest, RoutedRequest
from services.router import service
from services.router.limits import TenantLimiter
from services.router.seen import ForwardedLog
from services.router.service import Router
from shared import kafka
from shared.codec import decode, encode
from shared.memory import Memory
from shared.outcomes import Outcomes
from shared.topics import Priority, Topics, request_key

pytestmark = pytest.mark.integration

COUNT = 600
FAILED = 7  # the first sends to the model topic that time out


class FlakyOutcomes(Outcomes):
    """Outcomes whose first sends to a model topic time out at the broker (a retriable error), unsent."""

    failures = 0

    async def send(self, topic, value, key, *, partition=None):
        if ".model." in topic and FlakyOutcomes.failures < FAILED:
            FlakyOutcomes.failures += 1
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(RequestTimedOutError("injected: no acknowledgement"))
            return failed
        return await super().send(topic, value, key, partition=partition)


async def test_a_failed_round_and_the_rounds_after_it_are_read_again_and_forwarded_once(
        broker, redis_url, policies, monkeypatch):
    topics = Topics(f"syrounds{uuid.uuid4().hex[:6]}")
    assert ".model." in topics.model("small")
    await kafka.ensure_topics(broker, topics.plan(["small"]))
    tenant = f"r{uuid.uuid4().hex[:6]}"
    requests = [InferenceRequest(tenant=tenant, route="chat", reply_to="rounds", prompt=f"round question {i}")
                for i in range(COUNT)]
    producer = kafka.producer(broker)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topics.requests(Priority.standard), encode(r),
                                                   key=request_key("chat")) for r in requests])
    finally:
        await producer.stop()

    monkeypatch.setattr(service, "Outcomes", FlakyOutcomes)
    monkeypatch.setattr(service, "RETRY_MIN_S", 0.05)
    redis = Redis.from_url(redis_url)
    group = f"router-{topics.prefix}"
    # Small rounds, so that several are unsettled when the first one fails.
    router = Router(bootstrap=broker, topics=topics, policies=policies, forwarded=ForwardedLog(redis),
                    limiter=TenantLimiter(redis), memory=Memory(redis), max_batch=40, group_id=group)
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop))
    reader = kafka.consumer(broker, topics.model("small"), group_id=None, auto_offset_reset="earliest")
    await reader.start()
    forwarded: list[str] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while loop.time() < deadline and (len(forwarded) < COUNT or router.counts["redelivered"] == 0):
            for recs in (await reader.getmany(timeout_ms=500)).values():
                forwarded += [decode(RoutedRequest, rec.value).request.id for rec in recs]
        await asyncio.sleep(1)  # anything sent twice would be on the topic by now
        for recs in (await reader.getmany(timeout_ms=500)).values():
            forwarded += [decode(RoutedRequest, rec.value).request.id for rec in recs]
    finally:
        await reader.stop()
        stop.set()
        await task
        await redis.aclose()

    assert FlakyOutcomes.failures == FAILED
    assert sorted(forwarded) == sorted(r.id for r in requests), "each request forwarded exactly once"
    # The rounds after the failed one were settled before it failed, read again and skipped.
    assert router.counts["redelivered"] > 0
    assert router.counts["routed"] == COUNT + FAILED  # the failed sends were attempts too

    checker = kafka.consumer(broker, group_id=f"{group}.{Priority.standard.value}")
    await checker.start()
    try:
        tps = await _partitions(broker, topics.requests(Priority.standard))
        committed = {tp: await checker.committed(tp) or 0 for tp in tps}
        # Every request went to one partition (one key) of a fresh topic: committed past all of them.
        # (Not compared with end_offsets: Tansu's can lag behind what it holds.)
        assert sum(committed.values()) == COUNT, committed
    finally:
        await checker.stop()


async def _partitions(broker: str, topic: str) -> list[TopicPartition]:
    producer = kafka.producer(broker)
    await producer.start()
    try:
        return [TopicPartition(topic, p) for p in sorted(await producer.partitions_for(topic))]
    finally:
        await producer.stop()
