"""A provider key on real parts: a provider worker (the real Worker and ProviderBackend, in-process)
whose provider quotes the key back in every failure. The key reaches the provider and nothing else:
not the result on the reply topic, not the cost record, not the worker's log, not its metrics. (tests/unit/test_security.py tries each kind of failure on the
backend alone.)"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from prometheus_client import REGISTRY, generate_latest
from redis.asyncio import Redis

from schemas import InferenceRequest, InferenceResult, Status
from schemas.policy import ProviderSpec
from services.router.decide import decide
from services.worker.provider import ProviderBackend
from services.worker.service import Worker
from shared import kafka
from shared.codec import decode, encode
from shared.topics import Topics
from tests.http_fakes import serving
from tests.integration.test_fuzz_router import read_until, tail, warm
from tests.unit.test_security import KEY, KEY_ENV, EchoingProvider

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("failure", ["denied", "broken"])
async def test_a_key_the_provider_quotes_back_reaches_no_topic_log_or_metric(broker, redis_url, policies, monkeypatch,
                                                                           caplog, failure):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv(KEY_ENV, KEY)
    topics = Topics(f"sykey{uuid.uuid4().hex[:8]}")  # its own: no other test's requests for this model
    reply_to = "keys"
    await kafka.ensure_topics(broker, [*topics.plan(["large"]), topics.reply_spec(reply_to)])
    await warm(broker, [topics.replies(reply_to), topics.costs])
    watched = {name: await tail(broker, name) for name in (topics.replies(reply_to), topics.costs)}
    redis = Redis.from_url(redis_url)
    stop = asyncio.Event()
    records: list = []
    with serving(EchoingProvider) as url:
        EchoingProvider.sent.clear()
        backend = ProviderBackend(ProviderSpec(api="openai", base_url=url, model=failure, api_key_env=KEY_ENV))
        worker = Worker(model="large", engine=backend, bootstrap=broker, topics=topics, redis=redis)
        running = asyncio.create_task(worker.run(stop))
        try:
            request = InferenceRequest(tenant="keys", route="large-only", reply_to=reply_to, prompt="Hi")
            producer = kafka.producer(broker)
            await producer.start()
            try:
                routed = decide(request, policies)
                await producer.send_and_wait(topics.model("large"), encode(routed), key=routed.prefix_hash.encode())
            finally:
                await producer.stop()
            replies = watched[topics.replies(reply_to)]

            def answered() -> bool:
                return any(r.topic == topics.replies(reply_to) and r.value != b"warm-up" for r in records)

            await read_until(replies, records, answered, 60)
            await read_until(watched[topics.costs], records, lambda: False, 1)
        finally:
            stop.set()
            await asyncio.wait_for(running, 60)
            await backend.aclose()
            for consumer in watched.values():
                await consumer.stop()
            await redis.aclose()

    assert KEY in str(EchoingProvider.sent[-1].get("Authorization")), "the key did go to the provider"
    (reply,) = [decode(InferenceResult, r.value) for r in records if r.topic == topics.replies(reply_to)
                and r.value != b"warm-up"]
    assert reply.status in (Status.rejected, Status.failed) and "[key]" in reply.error.message
    assert [r for r in records if r.topic == topics.costs and r.value != b"warm-up"], "no cost record"
    assert not [r.topic for r in records if KEY.encode() in (r.value or b"")]
    assert KEY not in caplog.text
    assert KEY not in generate_latest(REGISTRY).decode()
