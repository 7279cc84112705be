"""The async Python client: publish a request, await its result on your reply topic.

    async with Client("127.0.0.1:9092", reply_to="billing-svc") as client:
        result = await client.complete(tenant="acme", route="chat",
                                       messages=[{"role": "user", "content": "hi"}])

        async for piece in client.stream(tenant="acme", route="chat",
                                         messages=[{"role": "user", "content": "hi"}]):
            ...  # StreamDelta pieces as the model writes, then the InferenceResult
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson

from aiokafka.structs import TopicPartition

from schemas import ChatMessage, InferenceRequest, InferenceResult, Priority, Sampling, StreamDelta
from shared import kafka
from shared.codec import decode, encode
from shared.errors import DependencyUnavailable, RequestTimeout, UndecodableMessage
from shared.topics import Topics, request_key

log = logging.getLogger(__name__)


class Client:
    """Correlates results with requests by id; several clients may share one reply topic."""

    def __init__(self, bootstrap: str, *, reply_to: str, topics: Topics | None = None, timeout_s: float = 60.0,
                 replication_factor: int = 1):
        self._bootstrap = bootstrap
        self.reply_to = reply_to
        self._topics = topics or Topics()
        self._timeout_s = timeout_s
        self._waiting: dict[str, asyncio.Future[InferenceResult]] = {}
        self._streams: dict[str, asyncio.Queue[StreamDelta]] = {}
        self._producer = None
        self._consumer = None
        self._reader: asyncio.Task | None = None
        self._replication_factor = replication_factor

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        reply_topic = self._topics.replies(self.reply_to)
        await kafka.ensure_topics(self._bootstrap, [self._topics.reply_spec(self.reply_to)], self._replication_factor)
        self._producer = kafka.producer(self._bootstrap)
        await self._producer.start()
        # No group: every client instance reads every partition of its reply topic from
        # the end, so it sees replies to its own requests whichever partition they land on.
        self._consumer = kafka.consumer(self._bootstrap, group_id=None, auto_offset_reset="latest")
        await self._consumer.start()
        await self._consumer.topics()
        partitions = [TopicPartition(reply_topic, p) for p in sorted(self._consumer.partitions_for_topic(reply_topic) or ())]
        if not partitions:
            raise DependencyUnavailable(f"the broker reports no partitions for the reply topic {reply_topic}")
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve positions now, so no reply can slip past before the first send
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_replies())
        self._reader.add_done_callback(self._reader_stopped)

    def _reader_stopped(self, task: asyncio.Task) -> None:
        """If reading replies fails, every waiting request fails with that error, not a vague timeout."""
        if task.cancelled() or task.exception() is None:
            return
        error = DependencyUnavailable(f"reading replies from {self._topics.replies(self.reply_to)} failed: "
                                      f"{task.exception()!r}")
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(error)

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for fut in self._waiting.values():
            fut.cancel()
        if self._consumer:
            await self._consumer.stop()
        if self._producer:
            await self._producer.stop()

    async def _read_replies(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    try:
                        if _is_delta(record.value):
                            delta = decode(StreamDelta, record.value)
                            stream = self._streams.get(delta.request_id)
                            if stream is not None:
                                stream.put_nowait(delta)
                            continue
                        result = decode(InferenceResult, record.value)
                    except UndecodableMessage as exc:
                        log.warning("ignoring an unreadable reply: %s", exc)
                        continue
                    fut = self._waiting.pop(result.request_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(result)

    def track(self, request_id: str) -> asyncio.Future[InferenceResult]:
        """A future for the result of a request this client did not send itself but that replies to its topic."""
        fut = self._waiting.get(request_id)
        if fut is None:
            fut = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        return fut

    async def submit(self, request: InferenceRequest, timeout_s: float | None = None) -> InferenceResult:
        """Publish `request` and return its result; raise RequestTimeout if none arrives in time."""
        if self._reader is None or self._reader.done():
            raise DependencyUnavailable("the client is not reading replies (not started, closed, or failed)")
        if request.reply_to != self.reply_to:
            request = request.model_copy(update={"reply_to": self.reply_to})
        fut = self.track(request.id)
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        try:
            sent = await self._producer.send(self._topics.requests(request.priority), encode(request),
                                             key=request_key(request.route))
            await sent
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"no result for request {request.id} (route {request.route!r}) within {timeout_s:.1f} s; "
                "is a router running, and a worker for the route's model?"
            ) from None
        finally:
            self._waiting.pop(request.id, None)

    async def stream_request(self, request: InferenceRequest,
                             timeout_s: float | None = None) -> AsyncIterator[StreamDelta | InferenceResult]:
        """Publish `request` with streaming on; yield its StreamDelta pieces as they come, then its
        InferenceResult. A piece with a higher `attempt` than the ones before (the request moved on
        to another model) starts the text anew; the result always holds the whole answer."""
        if request.reply_to != self.reply_to or not request.stream:
            request = request.model_copy(update={"reply_to": self.reply_to, "stream": True})
        pieces: asyncio.Queue[StreamDelta] = asyncio.Queue()
        self._streams[request.id] = pieces
        try:
            finished = asyncio.ensure_future(self.submit(request, timeout_s))
            try:
                while True:
                    piece = asyncio.ensure_future(pieces.get())
                    await asyncio.wait([piece, finished], return_when=asyncio.FIRST_COMPLETED)
                    if piece.done():
                        yield piece.result()
                        continue
                    piece.cancel()
                    while not pieces.empty():  # pieces that came just before the result
                        yield pieces.get_nowait()
                    yield finished.result()
                    return
            finally:
                if not finished.done():
                    finished.cancel()
        finally:
            self._streams.pop(request.id, None)

    def stream(self, *, tenant: str, route: str, messages: list[dict[str, str]] | None = None,
               prompt: str | None = None, timeout_s: float | None = None,
               **fields: Any) -> AsyncIterator[StreamDelta | InferenceResult]:
        """Build a streaming request from plain values (as `complete` does) and stream it."""
        return self.stream_request(self._build(tenant=tenant, route=route, messages=messages, prompt=prompt,
                                               stream=True, **fields), timeout_s)

    async def complete(self, *, tenant: str, route: str, messages: list[dict[str, str]] | None = None,
                       prompt: str | None = None, priority: Priority | str = Priority.standard,
                       max_tokens: int = 256, temperature: float = 0.7, seed: int | None = None,
                       timeout_s: float | None = None, **fields: Any) -> InferenceResult:
        """Build a request from plain values and submit it."""
        return await self.submit(self._build(tenant=tenant, route=route, messages=messages, prompt=prompt,
                                             priority=priority, max_tokens=max_tokens, temperature=temperature,
                                             seed=seed, **fields), timeout_s)

    def _build(self, *, tenant: str, route: str, messages: list[dict[str, str]] | None = None,
               prompt: str | None = None, priority: Priority | str = Priority.standard,
               max_tokens: int = 256, temperature: float = 0.7, seed: int | None = None,
               **fields: Any) -> InferenceRequest:
        return InferenceRequest(
            tenant=tenant,
            route=route,
            priority=Priority(priority),
            messages=[ChatMessage(**m) for m in messages] if messages is not None else None,
            prompt=prompt,
            sampling=Sampling(max_tokens=max_tokens, temperature=temperature, seed=seed),
            reply_to=self.reply_to,
            **fields,
        )


def _is_delta(value: bytes | None) -> bool:
    """Whether a reply-topic message is a StreamDelta (cheap: only streaming replies pay a parse)."""
    if not value or b'"delta"' not in value:
        return False
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("kind") == "delta"
