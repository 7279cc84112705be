"""Interactive before batch: with a batch flood queued, interactive requests are routed first,
and batch still gets its minimum share."""

from __future__ import annotations

import asyncio
import statistics
import uuid

import pytest
from redis.asyncio import Redis

from schemas import InferenceRequest, RoutedRequest
from services.router.limits import TenantLimiter
from services.router.seen import ForwardedLog
from services.router.service import Router
from shared import kafka
from shared.codec import decode, encode
from shared.memory import Memory
from shared.topics import Topics, request_key

pytestmark = pytest.mark.integration

FLOOD = 3000
URGENT = 600


async def test_a_batch_flood_does_not_hold_up_interactive_requests_nor_starve(broker, redis_url, policies):
    topics = Topics(f"syprio{uuid.uuid4().hex[:6]}")
    await kafka.ensure_topics(broker, topics.plan(["small"]))
    producer = kafka.producer(broker, linger_ms=5)
    await producer.start()
    tenant = f"p{uuid.uuid4().hex[:6]}"
    try:
        # The flood is queued first, the interactive requests behind it; then the router starts.
        for priority, n in (("batch", FLOOD), ("interactive", URGENT)):
            sends = [await producer.send(topics.requests(priority), encode(InferenceRequest(
                tenant=tenant, route="chat", priority=priority, reply_to="prio", prompt=f"{priority} {i}")),
                key=request_key("chat")) for i in range(n)]
            await asyncio.gather(*sends)
    finally:
        await producer.stop()

    redis = Redis.from_url(redis_url)
    router = Router(bootstrap=broker, topics=topics, policies=policies, forwarded=ForwardedLog(redis),
                    limiter=TenantLimiter(redis), memory=Memory(redis), max_batch=50, min_share=0.1,
                    group_id=f"router-{topics.prefix}")
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop))
    reader = kafka.consumer(broker, topics.model("small"), group_id=None, auto_offset_reset="earliest")
    await reader.start()
    order: list[tuple[int, int, str]] = []  # (received_at_ms, arrival index, priority)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while len(order) < FLOOD + URGENT and loop.time() < deadline:
            for recs in (await reader.getmany(timeout_ms=500)).values():
                for rec in recs:
                    routed = decode(RoutedRequest, rec.value)
                    order.append((routed.received_at_ms, len(order), routed.request.priority.value))
    finally:
        await reader.stop()
        stop.set()
        await task
        await redis.aclose()

    assert len(order) == FLOOD + URGENT, f"only {len(order)} of {FLOOD + URGENT} were forwarded"
    order.sort()
    positions = {p: [i for i, (_, _, prio) in enumerate(order) if prio == p] for p in ("interactive", "batch")}
    last_urgent = max(positions["interactive"])
    batch_before = sum(1 for i in positions["batch"] if i < last_urgent)
    # Every interactive request was routed before most of the flood that was queued ahead of it...
    assert last_urgent < (FLOOD + URGENT) / 2, f"the last interactive request was routed at {last_urgent}"
    # ...yet batch kept a share while interactive had a backlog: it never starves.
    # (each round of 50 reserves 5 for batch: about one batch request for every nine interactive ones)
    assert URGENT / 20 <= batch_before <= URGENT / 3, batch_before
    received = {p: [order[i][0] for i in positions[p]] for p in positions}
    start = order[0][0]
    urgent_done = max(received["interactive"]) - start
    batch_median = statistics.median(received["batch"]) - start
    assert urgent_done <= batch_median, (urgent_done, batch_median)
    print(f"interactive all routed after {urgent_done} ms; batch median {batch_median} ms; "
          f"{batch_before} batch requests routed in between")
