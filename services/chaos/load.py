"""The drills' steady load: requests of several tenants, routes and priorities at a fixed rate,
and everything that comes back for them, every copy of every reply and every dead letter."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

from aiokafka.structs import TopicPartition

from schemas import ChatMessage, DeadLetter, InferenceRequest, InferenceResult, Priority, Sampling
from shared import kafka
from shared.codec import decode, encode
from shared.errors import UndecodableMessage
from shared.topics import Topics, request_key

log = logging.getLogger(__name__)

REPLY_TO = "chaos"
TENANTS = ("acme", "globex", "initech")
PRIORITIES = (Priority.interactive, Priority.standard, Priority.batch)
# Questions asked again and again: after the first, the faq route answers them from Redis.
FAQ = ("How do I return an item?", "When do you open on Sunday?", "How long does delivery take?")
SEND_RETRY_S = 0.5


@dataclass
class Sent:
    request: InferenceRequest
    scenario: str
    acked_at: float  # monotonic: when the broker took it


@dataclass
class Reply:
    at: float
    raw: bytes
    result: InferenceResult


@dataclass
class Load:
    """Publishes requests at `rate_per_s` while a scenario is on, and collects every reply."""

    bootstrap: str
    topics: Topics
    run: str  # in every request id: ids never repeat across drills
    rate_per_s: float = 4.0
    fetch_wait_ms: int | None = None  # the rig's (Rig.fetch_wait_ms); None: the process's
    sent: dict[str, Sent] = field(default_factory=dict)
    replies: dict[str, list[Reply]] = field(default_factory=dict)
    dead_letters: list[tuple[float, DeadLetter]] = field(default_factory=list)
    send_errors: int = 0

    def __post_init__(self) -> None:
        self._scenario: str | None = None
        self._count = itertools.count()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await kafka.ensure_topics(self.bootstrap, [self.topics.reply_spec(REPLY_TO)])
        self._producer = kafka.producer(self.bootstrap)
        await self._producer.start()
        self._consumer = kafka.consumer(self.bootstrap, group_id=None, auto_offset_reset="earliest",
                                        fetch_max_wait_ms=self.fetch_wait_ms or kafka.fetch_wait_ms())
        await self._consumer.start()
        await self._consumer.topics()
        partitions = []
        for topic in (self.topics.replies(REPLY_TO), self.topics.dead_letter):
            partitions += [TopicPartition(topic, p) for p in sorted(self._consumer.partitions_for_topic(topic) or ())]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:
            await self._consumer.position(tp)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._publish())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._consumer.stop()
        await self._producer.stop()

    def begin(self, scenario: str) -> None:
        self._scenario = scenario

    def pause(self) -> None:
        self._scenario = None

    def of(self, scenario: str) -> list[Sent]:
        return [s for s in self.sent.values() if s.scenario == scenario]

    def final(self, request_id: str) -> Reply | None:
        replies = self.replies.get(request_id)
        return replies[0] if replies else None

    async def settle(self, scenario: str, timeout_s: float) -> None:
        """Wait until every request of `scenario` has an answer, or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(s.request.id not in self.replies for s in self.of(scenario)):
            await asyncio.sleep(0.25)

    def request(self, n: int, scenario: str) -> InferenceRequest:
        tenant = TENANTS[n % len(TENANTS)]
        priority = PRIORITIES[(n // len(TENANTS)) % len(PRIORITIES)]
        route = ("chat", "faq", "assist", "chat")[n % 4]
        text = FAQ[n % len(FAQ)] if route == "faq" else f"Drill {scenario}, question {n}: say something short."
        return InferenceRequest(
            id=f"{self.run}-{scenario}-{n}", tenant=tenant, route=route, priority=priority, reply_to=REPLY_TO,
            messages=[ChatMessage(role="user", content=text)], sampling=Sampling(max_tokens=12, temperature=0.0))

    async def send(self, request: InferenceRequest, scenario: str) -> None:
        """Publish until the broker takes it (the same bytes each try, as any producer retries)."""
        value = encode(request)
        while True:
            try:
                await (await self._producer.send(self.topics.requests(request.priority), value,
                                                 key=request_key(request.route)))
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker is away: a producer tries again
                self.send_errors += 1
                log.debug("send of %s failed (%r); trying again", request.id, exc)
                await asyncio.sleep(SEND_RETRY_S)
        self.sent[request.id] = Sent(request, scenario, time.monotonic())

    async def poison(self, messages: list[bytes]) -> None:
        """Publish bad messages onto the standard request topic."""
        for value in messages:
            await (await self._producer.send(self.topics.requests(Priority.standard), value, key=b"poison"))

    async def _publish(self) -> None:
        every_s = 1.0 / self.rate_per_s
        pending: set[asyncio.Task] = set()
        next_at = time.monotonic()
        while True:
            scenario = self._scenario
            if scenario is not None:
                # Sends do not wait for each other: one stuck on an absent broker does not stop the rest.
                task = asyncio.create_task(self.send(self.request(next(self._count), scenario), scenario))
                pending.add(task)
                task.add_done_callback(pending.discard)
            next_at += every_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _read(self) -> None:
        dead_letter = self.topics.dead_letter
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=200)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - across a broker restart: read on
                log.debug("reading replies failed (%r); reading on", exc)
                await asyncio.sleep(0.5)
                continue
            now = time.monotonic()
            for tp, records in batch.items():
                for record in records:
                    try:
                        if tp.topic == dead_letter:
                            self.dead_letters.append((now, decode(DeadLetter, record.value)))
                        elif b'"delta"' not in record.value:
                            result = decode(InferenceResult, record.value)
                            self.replies.setdefault(result.request_id, []).append(Reply(now, record.value, result))
                    except UndecodableMessage as exc:
                        log.warning("unreadable message on %s: %s", tp.topic, exc)
