"""Fuzzing the router on the real broker with hypothesis-generated bad messages: malformed bytes,
schema-invalid requests, oversize messages, unknown fields with wrong types, absurd sampling values.
Each must reach the dead-letter topic with a reason; each that names its sender (an id and a reply
topic in a readable JSON object) must get exactly one 'rejected' reply; and the router must keep
routing. No worker runs: bad input never reaches one, and a routed request is seen on its model topic.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
from aiokafka.errors import KafkaError
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from schemas import DeadLetter, InferenceRequest, InferenceResult, Priority, RoutedRequest, Status
from schemas.request import MAX_TEXT_CHARS
from services.router.limits import TenantLimiter
from services.router.seen import ForwardedLog
from services.router.service import MAX_REQUEST_BYTES, Router
from shared import kafka
from shared.codec import decode, encode
from shared.errors import UndecodableMessage
from shared.topics import Topics, request_key
from tests.unit.test_fuzz_decode import json_values, near_valid, valid_requests

pytestmark = pytest.mark.integration

ID = "__FUZZ_ID__"  # stands for a fresh request id in each generated message that names one
CORPUS_SIZE = 150
WAIT_S = 45
# What a dead letter of a message the router could not read says; "undeliverable" would mean it read
# the message but could not send the dead letter or reply saying why (the reason would be lost).
REFUSED = {"undecodable", "message_too_large"}


@dataclass
class Bad:
    value: bytes | None
    key: bytes | None
    topic: str
    sent: RecordMetadata | None = None

    @property
    def where(self) -> tuple[str, int, int]:
        return self.sent.topic, self.sent.partition, self.sent.offset


def generated(reply_to: str) -> list[tuple[bytes, bytes | None]]:
    """~CORPUS_SIZE (value, key) pairs from hypothesis, deterministic from run to run."""
    addressed = valid_requests(ids=st.just(ID), reply_to=st.just(reply_to))
    messages = st.one_of(
        near_valid(addressed),                                      # one mutation of a request naming us
        near_valid(addressed),
        near_valid(),                                               # ... of someone else's request
        st.binary(max_size=300),                                    # malformed bytes
        json_values.map(orjson.dumps),                              # JSON, but not a request
        st.dictionaries(st.text(max_size=12), json_values, max_size=5).map(   # an object naming us, nothing else right
            lambda d: orjson.dumps({"id": ID, "reply_to": reply_to, **d})),
    )
    out: list[tuple[bytes, bytes | None]] = []

    @settings(max_examples=CORPUS_SIZE, database=None, derandomize=True, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(messages, st.sampled_from([None, b"chat", b"fuzz", b"\x00\xff"]))
    def collect(value, key):
        out.append((value, key))

    collect()
    return out


def explicit(reply_to: str) -> list[bytes | None]:
    """Oversize messages and empty ones, which a generator reaches rarely or never."""
    base = {"id": ID, "tenant": "acme", "route": "chat", "reply_to": reply_to}
    return [
        None,                                                                  # a tombstone: no value at all
        b"",
        orjson.dumps({**base, "prompt": "x" * (MAX_TEXT_CHARS + 1)}),          # a prompt over the limit, ~1 MB
        orjson.dumps({**base, "prompt": "é" * (MAX_REQUEST_BYTES // 2 + 1)}),   # few enough characters, too many bytes
        orjson.dumps({**base, "prompt": "x" * 5 * 2**20}),                     # 5 MB: over the services' 4 MB sends
        orjson.dumps({**base, "messages": [{"role": "user", "content": "x"}] * 1025}),
        # Unknown fields with long names: the reason names each of them (up to five).
        orjson.dumps({**base, "prompt": "p", **{f"{i}" + "k" * (MAX_REQUEST_BYTES // 6): i for i in range(5)}}),
        orjson.dumps({**base, "prompt": "p", "sampling": {"max_tokens": -1, "temperature": "NaN", "top_p": 0}}),
    ]


def accepted(value: bytes | None) -> bool:
    """Whether the router takes this as a request: not over its size limit, and a valid InferenceRequest."""
    try:
        decode(InferenceRequest, value)
    except UndecodableMessage:
        return False
    return len(value) <= MAX_REQUEST_BYTES


def corpus(reply_to: str, topics: Topics) -> tuple[list[Bad], set[str]]:
    """The bad messages, each with a fresh id where it names one, and the set of those ids."""
    pairs = generated(reply_to) + [(value, b"explicit") for value in explicit(reply_to)]
    bad, ids = [], set()
    placeholder = orjson.dumps(ID)
    for i, (value, key) in enumerate(pairs):
        if value is not None and placeholder in value:
            request_id = uuid.uuid4().hex
            ids.add(request_id)
            value = value.replace(placeholder, orjson.dumps(request_id))
        if accepted(value):
            continue  # hypothesis made a valid request: not for this test
        bad.append(Bad(value, key, topics.requests(list(Priority)[i % len(Priority)])))
    return bad, ids


def addressed_to(value: bytes | None, reply_to: str) -> str | None:
    """The request id a sender can be answered under: a JSON object naming our reply topic and a string
    id, in a message the router reads (one over its size limit is dead-lettered unread)."""
    if not value or len(value) > MAX_REQUEST_BYTES:
        return None
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if isinstance(raw, dict) and raw.get("reply_to") == reply_to and isinstance(raw.get("id"), str):
        return raw["id"]
    return None


async def tail(broker: str, topic: str, *, from_start: bool = False) -> AIOKafkaConsumer:
    """A consumer of every partition of `topic`, from its current end (or its start: Tansu reports
    the end of an empty topic as 1, which would skip its first record)."""
    consumer = kafka.consumer(broker, group_id=None, auto_offset_reset="latest")
    await consumer.start()
    await consumer.topics()
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    assert partitions, f"no partitions for {topic}"
    consumer.assign(partitions)
    if from_start:
        await consumer.seek_to_beginning(*partitions)
    else:
        await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)
    return consumer


async def read_until(consumer: AIOKafkaConsumer, records: list[ConsumerRecord],
                     done: Callable[[], bool], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not done() and loop.time() < deadline:
        batch = await consumer.getmany(timeout_ms=200)
        records += [r for recs in batch.values() for r in recs]


async def drain(consumer: AIOKafkaConsumer, records: list[ConsumerRecord], timeout_s: float = 10) -> None:
    """Read everything on the consumer's partitions up to their end offsets as of now."""
    ends = await consumer.end_offsets(list(consumer.assignment()))
    read_to: dict[TopicPartition, int] = {tp: await consumer.position(tp) for tp in ends}

    def done() -> bool:
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            read_to[tp] = max(read_to[tp], r.offset + 1)
        return all(read_to[tp] >= end for tp, end in ends.items())

    await read_until(consumer, records, done, timeout_s)


def canary(reply_to: str) -> InferenceRequest:
    return InferenceRequest(tenant=f"fuzz-{uuid.uuid4().hex[:8]}", route="chat", prompt="still routing?",
                            reply_to=reply_to)


async def forwarded(consumer: AIOKafkaConsumer, request_id: str, timeout_s: float,
                    give_up: Callable[[], bool] = lambda: False) -> RoutedRequest | None:
    """The routed request with this id, once it is on the model topic; None if not within timeout_s."""
    seen: list[ConsumerRecord] = []
    found: list[RoutedRequest] = []

    def done() -> bool:
        while seen:
            routed = decode(RoutedRequest, seen.pop().value)
            if routed.request.id == request_id:
                found.append(routed)
        return bool(found) or give_up()

    await read_until(consumer, seen, done, timeout_s)
    done()
    return found[0] if found else None


async def test_fuzzed_bad_messages_are_dead_lettered_answered_and_the_router_keeps_routing(broker, topics, router):
    reply_to = f"fuzz-{uuid.uuid4().hex[:8]}"
    await kafka.ensure_topics(broker, [topics.reply_spec(reply_to)])
    bad, ids = corpus(reply_to, topics)
    assert len(bad) >= CORPUS_SIZE * 3 // 4, f"only {len(bad)} of the generated messages are bad"
    expected_replies = {i for b in bad if (i := addressed_to(b.value, reply_to)) in ids}
    assert len(expected_replies) >= 30, "too few generated messages name their sender for (b) to mean much"

    dead, replies, model = (await tail(broker, topics.dead_letter), await tail(broker, topics.replies(reply_to)),
                            await tail(broker, topics.model("small")))
    producer = kafka.producer(broker, max_request_size=16 * 2**20)
    await producer.start()
    problems: list[str] = []
    try:
        sends = [await producer.send(b.topic, b.value, key=b.key) for b in bad]
        for b, sent in zip(bad, await asyncio.gather(*sends)):
            b.sent = sent
        ok = canary(reply_to)
        await producer.send_and_wait(topics.requests("standard"), encode(ok), key=request_key(ok.route))

        # (a) every bad message is dead-lettered, found by the topic, partition and offset it was sent to.
        by_place = {b.where: b for b in bad}
        letters: dict[tuple[str, int, int], list[DeadLetter]] = {}
        dead_records: list[ConsumerRecord] = []

        def all_lettered() -> bool:
            while dead_records:
                letter = decode(DeadLetter, dead_records.pop().value)
                letters.setdefault((letter.source_topic, letter.partition, letter.offset), []).append(letter)
            return by_place.keys() <= letters.keys()

        await read_until(dead, dead_records, all_lettered, WAIT_S)
        all_lettered()
        for place, b in by_place.items():
            value = b.value or b""
            found = letters.get(place)
            if not found:
                problems.append(f"not dead-lettered: {place} {value[:120]!r} ({len(value)} bytes)")
                continue
            letter = found[0]
            if not letter.reason.strip() or letter.reason_code not in REFUSED:
                problems.append(f"dead letter of {place} {value[:80]!r} says {letter.reason_code!r}: "
                                f"{letter.reason[:200]!r}")
            if letter.payload_bytes != len(value) or (len(value) < 2**16 and
                                                      letter.payload != value.decode("utf-8", errors="replace")):
                problems.append(f"dead letter of {place} does not carry the message: {letter.payload[:80]!r}, "
                                f"{letter.payload_bytes} bytes")

        # (c) the router is still routing: the valid request sent after the corpus reaches its model topic.
        routed = await forwarded(model, ok.id, WAIT_S)
        if routed is None:
            problems.append("the router did not forward a valid request sent after the bad ones: it stopped")
        elif routed.model != "small" or (routed.request.tenant, routed.request.prompt) != (ok.tenant, ok.prompt):
            problems.append(f"the valid request was routed wrongly: {routed}")

        # (b) each message that names its sender gets exactly one rejection, saying why.
        reply_records: list[ConsumerRecord] = []
        got: Counter[str] = Counter()
        answers: dict[str, InferenceResult] = {}

        def all_answered() -> bool:
            while reply_records:
                result = decode(InferenceResult, reply_records.pop().value)
                got[result.request_id] += 1
                answers[result.request_id] = result
            return expected_replies <= got.keys()

        await read_until(replies, reply_records, all_answered, 15)
        await drain(replies, reply_records)  # to the end, so a second reply to anyone would be counted
        all_answered()
        for request_id in sorted(expected_replies):
            source = next(b for b in bad if addressed_to(b.value, reply_to) == request_id)
            what = f"{request_id} ({(source.value or b'')[:100]!r}, {len(source.value or b'')} bytes)"
            if got[request_id] != 1:
                problems.append(f"{got[request_id]} replies to {what}")
                continue
            result = answers[request_id]
            if result.status != Status.rejected or result.error is None or not result.error.message.strip():
                problems.append(f"reply to {what} is not a reasoned rejection: {result.status} {result.error}")
        # The canary is a valid request: when the session's worker runs, it answers it here too.
        named = {addressed_to(b.value, reply_to) for b in bad} | {ok.id}
        strays = [request_id for request_id in got if request_id not in named]
        if strays:
            problems.append(f"replies to ids no bad message named: {strays[:5]}")
    finally:
        await producer.stop()
        for consumer in (dead, replies, model):
            await consumer.stop()

    assert not problems, f"{len(problems)} problems with {len(bad)} bad messages:\n" + "\n".join(problems)


async def test_a_reply_topic_that_is_no_topic_name_does_not_hold_up_the_router(broker, topics, router):
    """Python's '$' also matches before a final newline: a reply_to of 'name\\n' is refused by the
    schema but must not send the router waiting on a topic that cannot exist."""
    reply_to = f"fuzz-{uuid.uuid4().hex[:8]}"
    dead, model = await tail(broker, topics.dead_letter), await tail(broker, topics.model("small"))
    producer = kafka.producer(broker)
    await producer.start()
    try:
        # First make sure the router has joined its group and is routing at all.
        warm = canary(reply_to)
        await producer.send_and_wait(topics.requests("standard"), encode(warm), key=request_key(warm.route))
        assert await forwarded(model, warm.id, 60) is not None, "the router did not start routing"
        sent = await producer.send_and_wait(topics.requests("standard"), orjson.dumps(
            {"id": uuid.uuid4().hex, "tenant": "acme", "route": "chat", "prompt": "x", "reply_to": reply_to + "\n"}),
            key=b"chat")
        ok = canary(reply_to)
        await producer.send_and_wait(topics.requests("standard"), encode(ok), key=request_key(ok.route))
        routed = await forwarded(model, ok.id, 10)
        records: list[ConsumerRecord] = []

        def lettered() -> bool:
            return any((letter.source_topic, letter.partition, letter.offset) == (sent.topic, sent.partition, sent.offset)
                       for letter in (decode(DeadLetter, r.value) for r in records))

        await read_until(dead, records, lettered, 5)
    finally:
        await producer.stop()
        await dead.stop()
        await model.stop()
    assert routed is not None, "a valid request waited more than 10 s behind one whose reply_to ends in a newline"
    assert lettered(), "the message with reply_to ending in a newline was not dead-lettered"


async def warm(broker: str, names: list[str]) -> None:
    """Write one marker record to each freshly created topic and wait until the broker has it:
    a new topic may refuse writes (NotLeaderForPartition) for a moment, and an empty one reports
    its end wrongly on Tansu. Tests read such topics from after the marker."""
    producer = kafka.producer(broker)
    await producer.start()
    try:
        for name in names:
            for attempt in range(50):
                try:
                    await producer.send_and_wait(name, b"warm-up")
                    break
                except KafkaError:
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"topic {name} never took a write")
    finally:
        await producer.stop()


@asynccontextmanager
async def own_router(broker: str, redis_url: str, policies):
    """A router on topics of its own: a message that stops a router stays uncommitted on its topic
    and would stop every later router of the session that reads the shared ones."""
    topics = Topics(f"syfuzz{uuid.uuid4().hex[:8]}")
    await kafka.ensure_topics(broker, topics.plan(["small"]))
    await warm(broker, [topics.dead_letter, topics.model("small")])
    redis = Redis.from_url(redis_url)
    router = Router(bootstrap=broker, topics=topics, policies=policies, forwarded=ForwardedLog(redis),
                    limiter=TenantLimiter(redis))
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop))
    try:
        yield topics, task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 60)
        await redis.aclose()


BIG = "1" + "0" * 24  # past 64 bits; pydantic's lax mode reads the string as an int


@pytest.mark.parametrize("fields", [
    pytest.param({"route": "chat", "sampling": {"seed": BIG}}, id="seed-forwarded"),
    pytest.param({"route": "no-such-route", "created_at_ms": BIG}, id="created_at-rejected"),
])
async def test_a_request_with_numbers_past_64_bits_does_not_stop_the_router(broker, topics, router, fields):
    """Integers past 64 bits once passed decode and then stopped the router when it re-encoded them;
    now they are refused at decode. Should that regress, the router task ends and this fails."""
    reply_to = f"fuzz-{uuid.uuid4().hex[:8]}"
    task = router.task
    if True:
        await kafka.ensure_topics(broker, [topics.reply_spec(reply_to)])
        await warm(broker, [topics.replies(reply_to)])
        dead, model, replies = (await tail(broker, topics.dead_letter), await tail(broker, topics.model("small")),
                                await tail(broker, topics.replies(reply_to)))
        producer = kafka.producer(broker)
        await producer.start()
        bad_id = uuid.uuid4().hex
        try:
            value = orjson.dumps({"id": bad_id, "tenant": "acme", "prompt": "x", "reply_to": reply_to, **fields})
            sent = await producer.send_and_wait(topics.requests("standard"), value, key=b"chat")
            ok = canary(reply_to)
            await producer.send_and_wait(topics.requests("standard"), encode(ok), key=request_key(ok.route))
            # A new router joins three consumer groups first: on Tansu that takes several seconds.
            routed = await forwarded(model, ok.id, 60, give_up=task.done)
            if task.done():
                pytest.fail(f"the router stopped: {'cancelled' if task.cancelled() else repr(task.exception())}")
            assert routed is not None, "the router did not forward a valid request sent after the bad one"
            # A first write to a topic Tansu has just created can be refused for a while
            # (NotLeaderForPartition): the router then reads its batch again, so allow for that.
            letters: list[ConsumerRecord] = []

            def mine() -> list[DeadLetter]:
                return [letter for letter in (decode(DeadLetter, r.value) for r in letters if r.value != b"warm-up")
                        if (letter.source_topic, letter.partition, letter.offset) == (sent.topic, sent.partition, sent.offset)]

            await read_until(dead, letters, lambda: bool(mine()), 90)
            answers: list[ConsumerRecord] = []

            def answered() -> list[InferenceResult]:
                return [a for a in (decode(InferenceResult, r.value) for r in answers if r.value != b"warm-up")
                        if a.request_id == bad_id]

            await read_until(replies, answers, lambda: bool(answered()), 90)
        finally:
            await producer.stop()
            for consumer in (dead, model, replies):
                await consumer.stop()
    (letter,) = mine()
    assert letter.reason.strip() and letter.reason_code == "undecodable"
    (answer,) = answered()
    assert answer.status == Status.rejected


def oversize(base: dict) -> dict[str, tuple[dict, str]]:
    """A request with one field over its bound, by name: (the message, the field its reason names)."""
    from schemas.request import MAX_JSON_DEPTH, MAX_KEY_CHARS, MAX_SCHEMA_BYTES, MAX_TOOLS, MAX_TOOLS_BYTES

    deep: dict = {}
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = {"type": "object", "properties": {"a": deep}}
    tool = {"type": "function", "function": {"name": "f", "description": "d"}}
    prompt = {**base, "prompt": "p"}
    return {
        "tenant": ({**prompt, "tenant": "t" * 65}, "tenant"),
        "route": ({**prompt, "route": "r" * 65}, "route"),
        "prompt": ({**base, "prompt": "x" * (MAX_TEXT_CHARS + 1)}, "prompt"),
        "content": ({**base, "messages": [{"role": "user", "content": "x" * (MAX_TEXT_CHARS + 1)}]}, "messages.0.content"),
        "conversation": ({**base, "messages": [{"role": "user", "content": "x" * (MAX_TEXT_CHARS // 2 + 1)}] * 2},
                         "the messages hold"),
        "messages": ({**base, "messages": [{"role": "user", "content": "x"}] * 1025}, "messages"),
        "stop words": ({**prompt, "sampling": {"stop": ["s"] * 17}}, "sampling.stop"),
        "stop word": ({**prompt, "sampling": {"stop": ["s" * 257]}}, "sampling.stop.0"),
        "response_schema": ({**prompt, "response_schema": {"description": "d" * MAX_SCHEMA_BYTES}}, "response_schema"),
        "response_schema depth": ({**prompt, "response_schema": deep}, "response_schema"),
        "tools": ({**prompt, "tools": [tool] * (MAX_TOOLS + 1)}, "tools"),
        "tools size": ({**prompt, "tools": [{**tool, "x": "d" * (MAX_TOOLS_BYTES // 8)}] * 9}, "tools"),
        "idempotency_key": ({**prompt, "idempotency_key": "k" * (MAX_KEY_CHARS + 1)}, "idempotency_key"),
        "prefix_key": ({**prompt, "prefix_key": "k" * (MAX_KEY_CHARS + 1)}, "prefix_key"),
    }


async def test_every_field_over_its_bound_is_dead_lettered_with_its_reason_and_answered(broker, topics, router):
    reply_to = f"fuzz-{uuid.uuid4().hex[:8]}"
    await kafka.ensure_topics(broker, [topics.reply_spec(reply_to)])
    await warm(broker, [topics.replies(reply_to)])
    cases = {}
    for name, (message, field) in oversize({"tenant": "acme", "route": "chat", "reply_to": reply_to}).items():
        request_id = uuid.uuid4().hex
        value = orjson.dumps({"id": request_id, **message})
        assert len(value) <= MAX_REQUEST_BYTES, f"{name}: the router would refuse it unread, by its size"
        cases[request_id] = (name, field, value)
    dead, replies, model = (await tail(broker, topics.dead_letter), await tail(broker, topics.replies(reply_to)),
                            await tail(broker, topics.model("small")))
    producer = kafka.producer(broker, max_request_size=4 * 2**20)
    await producer.start()
    try:
        sent = {}
        for request_id, (_, _, value) in cases.items():
            meta = await producer.send_and_wait(topics.requests("standard"), value, key=b"chat")
            sent[(meta.topic, meta.partition, meta.offset)] = request_id
        ok = canary(reply_to)
        await producer.send_and_wait(topics.requests("standard"), encode(ok), key=request_key(ok.route))
        letters: dict[str, DeadLetter] = {}
        answers: dict[str, InferenceResult] = {}
        dead_records: list[ConsumerRecord] = []
        reply_records: list[ConsumerRecord] = []

        def lettered() -> bool:
            for r in dead_records:
                if r.value != b"warm-up":
                    letter = decode(DeadLetter, r.value)
                    if (where := (letter.source_topic, letter.partition, letter.offset)) in sent:
                        letters[sent[where]] = letter
            return letters.keys() >= cases.keys()

        def answered() -> bool:
            for r in reply_records:
                if r.value != b"warm-up":
                    result = decode(InferenceResult, r.value)
                    answers[result.request_id] = result
            return answers.keys() >= cases.keys()

        await read_until(dead, dead_records, lettered, WAIT_S)
        await read_until(replies, reply_records, answered, WAIT_S)
        routed = await forwarded(model, ok.id, WAIT_S)
    finally:
        await producer.stop()
        for consumer in (dead, replies, model):
            await consumer.stop()
    problems = []
    for request_id, (name, field, value) in cases.items():
        letter, answer = letters.get(request_id), answers.get(request_id)
        if letter is None or letter.reason_code != "undecodable" or field not in letter.reason:
            problems.append(f"{name}: dead letter {letter and (letter.reason_code, letter.reason[:200])}")
            continue
        if letter.payload_bytes != len(value):
            problems.append(f"{name}: the dead letter does not carry the message ({letter.payload_bytes} bytes)")
        if answer is None or answer.status != Status.rejected or answer.error is None \
                or answer.error.message != letter.reason:
            problems.append(f"{name}: reply {answer and (answer.status, answer.error)}")
    assert not problems, "\n".join(problems)
    assert routed is not None and routed.request.id == ok.id, "the router stopped routing"
