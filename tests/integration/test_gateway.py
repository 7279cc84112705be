"""The OpenAI-compatible gateway, driven by the official `openai` client as a user would drive it,
against the real broker, router, vLLM worker and books."""

from __future__ import annotations

import asyncio
import uuid

import openai
import pytest
from aiokafka.structs import TopicPartition

from services.gateway.keys import digest
from services.gateway.main import serve
from services.stack import infra
from shared import kafka
from shared.settings import Settings
from tests.integration.conftest import wait_for_rows

pytestmark = pytest.mark.integration

KEY = "sk-test-" + uuid.uuid4().hex
CHAT_ONLY_KEY = "sk-test-chat-" + uuid.uuid4().hex


@pytest.fixture
async def gateway(broker, topics, policy_file, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"""
keys:
  - {{name: team, sha256: "{digest(KEY)}", tenant: gw-team, tenants: [limited]}}
  - {{name: chat-only, sha256: "{digest(CHAT_ONLY_KEY)}", tenant: gw-chat, routes: [chat]}}
""")
    settings = Settings(bootstrap=broker, topic_prefix=topics.prefix, policy_file=policy_file, gateway_keys=keys)
    port = infra.free_port()
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, port=port, host="127.0.0.1", ready=ready))
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiting], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # it failed to start: show why
    assert ready.is_set(), "the gateway did not start within 60 s"
    yield f"http://127.0.0.1:{port}/v1"
    stop.set()
    await task


def openai_client(base_url: str, key: str = KEY, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120, default_headers=headers)


async def request_offsets(broker, topics) -> dict:
    consumer = kafka.consumer(broker, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics.all_requests
               for p in sorted(consumer.partitions_for_topic(t) or await _partitions(consumer, t))]
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def _partitions(consumer, topic):
    await consumer.topics()
    return consumer.partitions_for_topic(topic) or ()


async def test_chat_completion_is_routed_answered_and_booked(worker, router, sink, store, gateway):
    client = openai_client(gateway)
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0)
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "small"  # the model that answered, not the route the caller named
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    request_id = raw.headers["x-request-id"]
    assert reply.id == f"chatcmpl-{request_id}"
    assert raw.headers["x-switchyard-model"] == "small"
    books = await wait_for_rows(store, "request_id = {id:String}", 1, {"id": request_id})
    assert books["records"] == 1
    assert books["tokens_out"] == reply.usage.completion_tokens
    assert books["tokens_in"] == reply.usage.prompt_tokens
    tenants = store.query("SELECT DISTINCT tenant FROM switchyard.cost_records FINAL WHERE request_id = {id:String}",
                          {"id": request_id})
    assert tenants == [{"tenant": "gw-team"}]  # billed to the key's tenant

    # Asked again with the same Idempotency-Key: the first answer, not run (nor billed) again.
    again = await client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Something else"}], max_tokens=8,
        extra_headers={"Idempotency-Key": "gw-once"})
    repeat = await client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Something else"}], max_tokens=8,
        extra_headers={"Idempotency-Key": "gw-once"})
    assert repeat.headers["x-switchyard-cache"] == "idempotent"
    assert repeat.parse().choices[0].message.content == again.parse().choices[0].message.content
    books = await wait_for_rows(store, "request_id IN {ids:Array(String)}", 2,
                                {"ids": [again.headers["x-request-id"], repeat.headers["x-request-id"]]})
    assert books["records"] == 2
    repeat_cost = store.query("SELECT sum(cost_nano_usd) AS c FROM switchyard.cost_records FINAL "
                              "WHERE request_id = {id:String}", {"id": repeat.headers["x-request-id"]})
    assert repeat_cost == [{"c": 0}]


async def test_a_stream_carries_the_same_answer_as_a_plain_request(worker, router, gateway):
    client = openai_client(gateway)
    ask = {"model": "long", "messages": [{"role": "user", "content": "Count to twenty"}], "max_tokens": 300,
           "temperature": 0, "seed": 7}
    # The same content twice would be answered as a repeat of the first: distinct idempotency keys run both.
    plain = await client.chat.completions.create(**ask, extra_headers={"Idempotency-Key": uuid.uuid4().hex})
    chunks = [c async for c in await client.chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}, extra_headers={"Idempotency-Key": uuid.uuid4().hex})]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    # The engine hands over what it has each time the worker asks: a long answer comes in several pieces.
    assert plain.usage.completion_tokens > 100, plain.usage
    assert len(pieces) > 1, "the answer came in one piece: it was not streamed"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id}


async def test_completions_plain_and_streamed(worker, router, gateway):
    client = openai_client(gateway)
    plain = await client.completions.create(model="long", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert plain.object == "text_completion" and plain.model == "small" and plain.usage.completion_tokens > 0
    streamed = [c async for c in await client.completions.create(model="long", prompt="Once upon a time",
                                                                   max_tokens=12, temperature=0, stream=True)]
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason


async def test_models_lists_the_routes_a_key_may_use(gateway, policies):
    everything = [m.id async for m in openai_client(gateway).models.list()]
    assert everything == sorted(policies.routes)
    assert [m.id async for m in openai_client(gateway, CHAT_ONLY_KEY).models.list()] == ["chat"]


async def test_a_wrong_key_gets_401_and_nothing_reaches_the_topics(router, gateway, broker, topics):
    before = await request_offsets(broker, topics)
    for key in ("sk-wrong", ""):
        with pytest.raises(openai.AuthenticationError) as caught:
            await openai_client(gateway, key or "x").chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await openai_client(gateway, "sk-wrong").models.list()
    assert await request_offsets(broker, topics) == before


async def test_refusals_name_what_is_wrong_and_publish_nothing(router, gateway, broker, topics):
    before = await request_offsets(broker, topics)
    chat_only = openai_client(gateway, CHAT_ONLY_KEY)
    with pytest.raises(openai.NotFoundError) as caught:
        await chat_only.chat.completions.create(model="long", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client(gateway).chat.completions.create(model="chat", n=2,
                                                             messages=[{"role": "user", "content": "hi"}])
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client(gateway).chat.completions.create(model="chat", messages=[])
    assert caught.value.param == "messages"
    with pytest.raises(openai.PermissionDeniedError):  # a tenant the key may not bill
        await openai_client(gateway, **{"X-Switchyard-Tenant": "someone-else"}).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}])
    assert await request_offsets(broker, topics) == before


async def test_router_refusals_come_back_as_openai_errors(worker, router, gateway):
    limited = openai_client(gateway, **{"X-Switchyard-Tenant": "limited"})  # 2 requests a minute
    ask = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    statuses = []
    for _ in range(3):
        try:
            await limited.chat.completions.create(**ask)
            statuses.append(200)
        except openai.RateLimitError as exc:
            statuses.append(exc.status_code)
            assert int(exc.response.headers["retry-after"]) >= 1
            assert exc.code == "rate_limited"
    assert statuses == [200, 200, 429]
    with pytest.raises(openai.APIStatusError) as caught:  # longer than any model of the route can read
        await openai_client(gateway).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "word " * 5000}], max_tokens=2)
    print(caught.value.status_code, caught.value.code, caught.value.message)
    assert (caught.value.status_code, caught.value.code) == (422, "no_capable_model")
