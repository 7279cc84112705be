"""The worker on real parts (Tansu, redis-server, chDB, vLLM on CPU): streaming, deadlines inside
generation, redelivered requests answered from their record, hand-offs down the chain (confidence
escalation to a provider model, moving on from a provider that refuses), the load report, and
prefix affinity giving way under skew."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from aiokafka.structs import TopicPartition
from redis.asyncio import Redis

from schemas import (CostRecord, InferenceRequest, InferenceResult, ModelHealth, ProviderSpec, RoutedRequest,
                     Sampling, Status, StreamDelta, now_ms)
from services.router.affinity import home_partition
from services.router import train
from services.router.decide import decide
from services.worker.engine import Completion
from services.worker.ledger import DELIVERED_PREFIX, PREFIX as LEDGER_PREFIX
from services.worker.provider import ProviderBackend
from services.worker.service import Worker
from shared import kafka
from shared.codec import decode, encode
from shared.topics import Topics, request_key
from tests.integration.conftest import records_on, replies_on, wait_for_rows

pytestmark = pytest.mark.integration


def tenant() -> str:
    return f"w{uuid.uuid4().hex[:8]}"


class _Provider(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint: answers every chat completion, or refuses it with a 429."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.calls.append(body)
        if self.server.refuse:
            reply, status = {"error": {"message": "rate limit reached", "type": "rate_limit"}}, 429
        else:
            reply, status = {
                "id": "c1", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "a careful answer"},
                             "logprobs": {"content": [{"token": t, "logprob": -0.01, "top_logprobs": []}
                                                      for t in ("a", " careful", " answer")]}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }, 200
        data = orjson.dumps(reply)
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        if status == 429:
            self.send_header("retry-after", "1")
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
async def serving(broker, topics, redis_url):
    """Serves a model of the test policy with a provider worker (the real ProviderBackend and
    Worker, in-process) against a local OpenAI-compatible endpoint; stops both after the test."""
    started: list[tuple[asyncio.Event, asyncio.Task, ProviderBackend, ThreadingHTTPServer]] = []
    redis = Redis.from_url(redis_url)

    async def serve(model: str, *, refuse: bool = False) -> list[dict]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
        server.calls, server.refuse = [], refuse
        threading.Thread(target=server.serve_forever, daemon=True).start()
        backend = ProviderBackend(ProviderSpec(api="openai", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                               model=f"remote-{model}", timeout_s=10))
        worker = Worker(model=model, engine=backend, bootstrap=broker, topics=topics, redis=redis)
        stop = asyncio.Event()
        started.append((stop, asyncio.create_task(worker.run(stop)), backend, server))
        return server.calls

    yield serve
    for stop, *_ in started:
        stop.set()
    await asyncio.gather(*(task for _, task, *_ in started))
    for _, _, backend, server in started:
        await backend.aclose()
        server.shutdown()
    await redis.aclose()


async def test_a_streaming_request_sees_its_text_before_the_result(worker, router, sink, client):
    pieces: list[StreamDelta] = []
    result = None
    async for piece in client.stream(tenant=tenant(), route="chat", max_tokens=16,
                                     messages=[{"role": "user", "content": "tell me about the sea"}]):
        if isinstance(piece, StreamDelta):
            assert result is None, "a delta came after the result"
            pieces.append(piece)
        else:
            result = piece
    assert result is not None and result.status == Status.ok, result
    assert pieces, "no deltas before the result"
    assert [p.seq for p in pieces] == list(range(len(pieces)))
    assert "".join(p.text for p in pieces) == result.output
    assert all(p.model == "small" and p.attempt == 0 for p in pieces)


async def test_generation_past_the_deadline_is_cut_short_and_answered_expired(worker, router, sink, client, store):
    who = tenant()
    story = dict(route="long", max_tokens=1000, temperature=1.0, seed=7,
                 messages=[{"role": "user", "content": "write a very long story"}])
    # A first request, so the router has joined its groups before the deadline starts to run.
    assert (await client.complete(tenant=who, route="chat", max_tokens=1, messages=[{"role": "user", "content": "hi"}])).status == Status.ok
    # The same seeded story without a deadline, twice, for other tenants (so neither is answered as
    # a repeat): it runs its 1000 tokens, and says how long they take on this machine now.
    runs = [await client.complete(tenant=tenant(), **story) for _ in range(2)]
    assert all(r.status == Status.ok and r.tokens_out == 1000 for r in runs), runs
    generating_ms = min(r.latency.total_ms - r.latency.queue_ms for r in runs)
    budget_ms = max(200, generating_ms // 3)
    result = await client.complete(tenant=who, **story, deadline_unix_ms=now_ms() + budget_ms)
    assert result.status == Status.expired, (result, [r.latency for r in runs])
    assert result.error.code == "deadline_passed"
    # It ran, and was stopped mid-way: some tokens, far fewer than asked, and an answer soon after the deadline.
    assert 0 < result.tokens_out < 900 and result.finish_reason == "deadline", result
    assert result.latency.total_ms < budget_ms + 3000
    books = await wait_for_rows(store, "tenant = {t:String} AND status = 'expired'", 1, {"t": who})
    assert books["records"] == 1 and books["tokens_out"] == result.tokens_out and books["cost_nano_usd"] > 0


def _sampled(who: str, client, policies, content: str, max_tokens: int) -> RoutedRequest:
    """A chat request sampled at temperature 1 (a re-run would not write the same text), as the router routes it."""
    return decide(InferenceRequest(tenant=who, route="chat", reply_to=client.reply_to,
                                   messages=[{"role": "user", "content": content}],
                                   sampling=Sampling(max_tokens=max_tokens, temperature=1.0)), policies)


async def _logged(worker, seen: int, text: str, timeout_s: float = 60) -> None:
    """Wait until the worker's log, after its first `seen` lines, has a line with `text`."""
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in worker.lines[seen:]):
        assert time.monotonic() < deadline, "".join(worker.lines[-20:])
        await asyncio.sleep(0.2)


async def test_a_redelivered_request_is_answered_from_its_record_not_run_again(worker, broker, topics, client,
                                                                                sink, store, policies, redis_url):
    who = tenant()
    routed = _sampled(who, client, policies, "say something random", 16)
    request = routed.request
    redis = Redis.from_url(redis_url)
    producer = kafka.producer(broker)
    await producer.start()

    async def redeliver():
        await producer.send_and_wait(topics.model("small"), encode(routed), key=routed.prefix_hash.encode())

    try:
        first = client.track(request.id)
        await redeliver()
        answer = await asyncio.wait_for(first, 60)
        assert await redis.exists(f"{LEDGER_PREFIX}{who}:{request.id}:0")
        assert await redis.exists(f"{DELIVERED_PREFIX}{who}:{request.id}:0")
        # As Kafka redelivers it when its worker recorded the outcome but died before the broker
        # acknowledged it: sent again from the record, not run again.
        await redis.delete(f"{DELIVERED_PREFIX}{who}:{request.id}:0")
        again = client.track(request.id)
        await redeliver()
        repeat = await asyncio.wait_for(again, 60)
        # Sampled at temperature 1 from a random model, a re-run could not write the same text.
        assert repeat == answer
        # Redelivered once more, now that its answer reached the broker: nothing is sent at all.
        seen = len(worker.lines)
        await redeliver()
        await _logged(worker, seen, f"request {request.id} attempt 0 was answered before")
    finally:
        await producer.stop()
        await redis.aclose()
    assert answer.status == Status.ok and answer.tokens_out > 0
    replies = await replies_on(broker, topics.replies(client.reply_to), {request.id})
    assert len(replies[request.id]) == 2 and len(set(replies[request.id])) == 1
    books = await wait_for_rows(store, "tenant = {t:String}", 1, {"t": who})
    assert books["records"] == 1 and books["tokens_out"] == answer.tokens_out


async def test_two_copies_of_a_request_taken_together_run_once(worker, broker, topics, client, sink, store,
                                                                policies):
    """A router that dies after forwarding a request, before recording it, forwards it again once
    restarted, maybe while the first copy is still running: the second copy waits for the first and
    is answered from its record. One run, one answer, one cost record."""
    who = tenant()
    routed = _sampled(who, client, policies, "say something random, twice", 64)
    request = routed.request
    producer = kafka.producer(broker)
    await producer.start()
    seen = len(worker.lines)
    try:
        first = client.track(request.id)
        # In one produce batch, so the worker takes both in one fetch.
        sent = [await producer.send(topics.model("small"), encode(routed), key=routed.prefix_hash.encode())
                for _ in range(2)]
        await asyncio.gather(*sent)
        answer = await asyncio.wait_for(first, 60)
        await _logged(worker, seen, f"request {request.id} attempt 0 was answered before")
    finally:
        await producer.stop()
    assert any(f"request {request.id} attempt 0 is here twice" in line for line in worker.lines[seen:])
    assert answer.status == Status.ok and answer.tokens_out > 0
    replies = await replies_on(broker, topics.replies(client.reply_to), {request.id})
    assert len(replies[request.id]) == 1
    await wait_for_rows(store, "tenant = {t:String}", 1, {"t": who})
    # The sink books on a 0.2 s timer: a second record, were there one, would be in by now.
    books = await wait_for_rows(store, "tenant = {t:String}", 2, {"t": who}, timeout_s=3)
    assert books["records"] == 1 and books["tokens_out"] == answer.tokens_out


class _Engine:
    """A backend that answers at once, or (hanging) never, until it is cancelled."""

    def __init__(self, hanging: bool):
        self.hanging, self.started, self.cancelled = hanging, asyncio.Event(), 0

    async def run(self, request, *, request_id, max_tokens, deadline_ms=None, on_text=None) -> Completion:
        self.started.set()
        if self.hanging:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return Completion(text="from the next owner", finish_reason="stop", tokens_in=3, tokens_out=4,
                          cached_tokens=0, ttft_ms=1)

    def load(self):
        return {"kv_usage": None}

    def shutdown(self) -> None:
        pass


async def test_a_request_still_running_when_the_drain_grace_ends_is_run_by_the_next_owner_only(
        broker, policies, redis_url):
    topics = Topics(f"sydrain{uuid.uuid4().hex[:8]}")  # its own: no other test's requests for this model
    await kafka.ensure_topics(broker, [*topics.plan(["large"]), topics.reply_spec("drain")])
    request = InferenceRequest(tenant=tenant(), route="large-only", reply_to="drain",
                               messages=[{"role": "user", "content": "take your time"}])
    routed = decide(request, policies)
    redis = Redis.from_url(redis_url)
    try:
        stuck = _Engine(hanging=True)
        first = Worker(model="large", engine=stuck, bootstrap=broker, topics=topics, redis=redis, drain_grace_s=1.0)
        stop = asyncio.Event()
        running = asyncio.create_task(first.run(stop))
        producer = kafka.producer(broker)
        await producer.start()
        try:
            await producer.send_and_wait(topics.model("large"), encode(routed), key=routed.prefix_hash.encode())
        finally:
            await producer.stop()
        await asyncio.wait_for(stuck.started.wait(), 60)
        stop.set()  # as SIGTERM does: the drain waits 1 s, then stops what is left
        await asyncio.wait_for(running, 60)
        assert stuck.cancelled == 1

        # The partition's next owner finds it uncommitted and runs it; the stopped run sent nothing.
        stop = asyncio.Event()
        running = asyncio.create_task(Worker(model="large", engine=_Engine(hanging=False), bootstrap=broker,
                                             topics=topics, redis=redis).run(stop))
        try:
            deadline = time.monotonic() + 90
            while not (replies := await replies_on(broker, topics.replies("drain"), {request.id})):
                assert time.monotonic() < deadline, "the next owner never answered"
                await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.wait_for(running, 60)
    finally:
        await redis.aclose()
    (reply,) = [decode(InferenceResult, value) for value in replies[request.id]]
    assert reply.status == Status.ok and reply.output == "from the next owner"
    costs = [decode(CostRecord, value) for value in await records_on(broker, topics.costs)]
    assert [(c.request_id, c.tokens_out) for c in costs] == [(request.id, 4)]


async def test_a_low_confidence_answer_escalates_and_teaches_the_router(worker, router, sink, client, store, policies,
                                                                        serving, broker, topics, embedder, tmp_path):
    await serving("big")
    who = tenant()
    result = await client.complete(tenant=who, route="escalating", max_tokens=8,
                                   messages=[{"role": "user", "content": "hi there"}])
    assert result.status == Status.ok, result
    # The tiny random model is never 90% sure of anything: its answer went on to "big", a provider model.
    assert result.model == "big" and result.output == "a careful answer"
    assert result.escalation_path == ["small", "big"]
    assert any(reason.startswith("escalated: confidence") for reason in result.route_reasons), result.route_reasons
    books = await wait_for_rows(store, "tenant = {t:String}", 2, {"t": who})
    assert books["records"] == 2
    rows = store.query("SELECT attempt, model, status, cost_nano_usd, tokens_out FROM switchyard.cost_records FINAL "
                       "WHERE tenant = {t:String} ORDER BY attempt", {"t": who})
    assert [(r["attempt"], r["model"], r["status"]) for r in rows] == [(0, "small", "ok"), (1, "big", "ok")]
    assert rows[0]["cost_nano_usd"] > 0  # the small model's attempt is billed too
    assert rows[1]["cost_nano_usd"] == policies.models["big"].price.cost_nano_usd(7, 3)

    # The small model's check went on the escalations topic: the router can learn the request was hard.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        learned = {r.id: label for r, label in await train.history(broker, topics)}
        if result.request_id in learned or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert learned.get(result.request_id) == "hard"
    report = await asyncio.to_thread(train.fit_file, train.BUNDLED, tmp_path / "classifier.json",
                                     embedder=embedder, extra=[(r, label) for r, label in
                                                               await train.history(broker, topics)])
    assert report["from_history"] >= 1 and (tmp_path / "classifier.json").exists()


async def test_a_refused_call_moves_on_to_the_next_model_of_the_chain(worker, router, sink, client, store, serving):
    calls = await serving("flaky", refuse=True)
    who = tenant()
    result = await client.complete(tenant=who, route="moving-on", max_tokens=8,
                                   messages=[{"role": "user", "content": "hello"}])
    assert result.status == Status.ok, result
    assert result.model == "small" and result.escalation_path == ["flaky", "small"]
    assert len(calls) == 1  # moved on, not retried against the same endpoint
    assert any("flaky failed (provider_rate_limited)" in reason for reason in result.route_reasons)
    await wait_for_rows(store, "tenant = {t:String}", 2, {"t": who})
    rows = store.query("SELECT attempt, model, status, cost_nano_usd FROM switchyard.cost_records FINAL "
                       "WHERE tenant = {t:String} ORDER BY attempt", {"t": who})
    assert [(r["attempt"], r["model"], r["status"], r["cost_nano_usd"] > 0) for r in rows] == [
        (0, "flaky", "failed", False), (1, "small", "ok", True)]


async def test_the_load_report_carries_partitions_kv_usage_and_prefix_hits(worker, router, client, broker, topics):
    system = {"role": "system", "content": "You are a patient guide to the rivers of Europe. " * 6}
    for i in range(3):  # the same long prefix three times: later ones reuse its KV blocks
        result = await client.complete(tenant=tenant(), route="chat", max_tokens=4,
                                       messages=[system, {"role": "user", "content": f"river {i}?"}])
        assert result.status == Status.ok
    reader = kafka.consumer(broker, topics.health, group_id=None, auto_offset_reset="latest")
    await reader.start()
    try:
        report = None
        deadline = asyncio.get_running_loop().time() + 15
        while report is None and asyncio.get_running_loop().time() < deadline:
            for records in (await reader.getmany(timeout_ms=500)).values():
                for record in records:
                    health = decode(ModelHealth, record.value)
                    if health.model == "small" and health.requests > 0:
                        report = health
    finally:
        await reader.stop()
    assert report is not None, "no load report from the small worker"
    partitions = len(await _partitions(broker, topics.model("small")))
    assert sorted(report.partition_backlog) == list(range(partitions))  # the only worker owns them all
    assert report.backlog == sum(report.partition_backlog.values())
    assert report.kv_usage is not None and 0 <= report.kv_usage <= 1
    assert report.prefix_hit_rate is not None and report.prefix_hit_rate > 0


async def _partitions(broker, topic) -> set[int]:
    consumer = kafka.consumer(broker, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        return consumer.partitions_for_topic(topic) or set()
    finally:
        await consumer.stop()


async def test_a_hot_partition_spills_to_the_least_loaded_one(router, broker, topics):
    """Affinity holds while the prefix's partition keeps up, and gives way once it is over the
    model's spill_backlog (8 by default); read off the topic of "large", which no worker serves."""
    partitions = sorted(await _partitions(broker, topics.model("large")))
    history = [{"role": "user", "content": f"hot conversation {uuid.uuid4()}"}, {"role": "assistant", "content": "go on"}]
    request = InferenceRequest(tenant=tenant(), route="large-only", reply_to="nobody",
                               messages=[*history, {"role": "user", "content": "first question"}])
    home = home_partition(decide(request, router.policies).prefix_hash.encode(), len(partitions))
    producer = kafka.producer(broker)
    await producer.start()
    reader = kafka.consumer(broker, group_id=None, auto_offset_reset="latest")
    await reader.start()
    try:
        reader.assign([TopicPartition(topics.model("large"), p) for p in partitions])
        for p in partitions:
            await reader.position(TopicPartition(topics.model("large"), p))

        async def report(backlog: dict[int, int]) -> None:
            name = f"test-{uuid.uuid4().hex[:6]}"
            deadline = time.monotonic() + 20
            # Sent until the router has it: its reader starts at the topic's end, maybe after the first.
            while not any(h.worker == name for h in router.health.fresh("large")):
                assert time.monotonic() < deadline, "the router did not see the report"
                health = ModelHealth(model="large", worker=name, ts_ms=now_ms(), interval_s=30, window_s=60,
                                     requests=0, errors=0, in_flight=4, capacity=4,
                                     backlog=sum(backlog.values()), partition_backlog=backlog)
                await producer.send_and_wait(topics.health, encode(health), key=b"large")
                await asyncio.sleep(0.3)

        async def landed(req: InferenceRequest) -> int:
            await producer.send_and_wait(topics.requests(req.priority), encode(req), key=request_key(req.route))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for records in (await reader.getmany(timeout_ms=500)).values():
                    for record in records:
                        if decode(RoutedRequest, record.value).request.id == req.id:
                            return record.partition
            raise AssertionError(f"request {req.id} was not forwarded")

        await report({p: 0 for p in partitions})
        assert await landed(request) == home
        skewed = {p: (50 if p == home else 0) for p in partitions}
        await report(skewed)
        # The next turn of the same conversation: the same prefix, so the same home partition.
        follow_up = InferenceRequest(tenant=request.tenant, route="large-only", reply_to="nobody",
                                     messages=[*history, {"role": "user", "content": "second question"}])
        assert decide(follow_up, router.policies).prefix_hash == decide(request, router.policies).prefix_hash
        spilled = await landed(follow_up)
        assert spilled != home and spilled == min(p for p in partitions if p != home)
        assert router.counts["spilled"] >= 1
    finally:
        await reader.stop()
        await producer.stop()
