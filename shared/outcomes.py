"""Finishing a request: its result on the reply topic and its cost record, or a dead letter.

Every service that ends a request (the router for rejections, the worker for model calls)
goes through here, so each final answer has exactly one result and one cost record.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from schemas import (
    CacheHit,
    CostRecord,
    DeadLetter,
    ErrorInfo,
    InferenceRequest,
    InferenceResult,
    Latency,
    Status,
    now_ms,
)
from schemas._base import NAME_PATTERN
from schemas.cost import U32
from shared import metrics
from shared.codec import encode
from shared.topics import Topics, cost_key, reply_key

log = logging.getLogger(__name__)

DEAD_LETTER_PAYLOAD_CHARS = 64 * 1024


def error_result(request: InferenceRequest, status: Status, code: str, message: str, *,
                 retriable: bool = False, retry_after_ms: int | None = None) -> InferenceResult:
    return InferenceResult(
        request_id=request.id,
        tenant=request.tenant,
        route=request.route,
        status=status,
        latency=Latency(total_ms=max(0, now_ms() - request.created_at_ms)),
        error=ErrorInfo(code=code, message=message, retriable=retriable, retry_after_ms=retry_after_ms),
    )


def cost_record(request: InferenceRequest, result: InferenceResult, *, cost_nano_usd: int = 0,
                attempt: int = 0) -> CostRecord:
    if result.cache_hit != CacheHit.none:
        # Answered from memory: no model ran for this request, so it used no tokens.
        return CostRecord(
            request_id=request.id, attempt=attempt, ts_ms=request.created_at_ms, tenant=request.tenant,
            route=request.route, model="", priority=request.priority.value, status=result.status,
            cache_hit=result.cache_hit, tokens_in=0, tokens_out=0, cached_tokens=0, cost_nano_usd=0,
            latency_ms=min(result.latency.total_ms, U32),
        )
    return CostRecord(
        request_id=request.id,
        attempt=attempt,
        ts_ms=request.created_at_ms,
        tenant=request.tenant,
        route=request.route,
        model=result.model or "",
        priority=request.priority.value,
        status=result.status,
        cache_hit=result.cache_hit,
        tokens_in=result.tokens_in,
        tokens_out=result.tokens_out,
        cached_tokens=result.cached_tokens,
        cost_nano_usd=cost_nano_usd,
        latency_ms=min(result.latency.total_ms, U32),
        ttft_ms=None if result.latency.ttft_ms is None else min(result.latency.ttft_ms, U32),
    )


async def delivered(sending: Awaitable[list[asyncio.Future]]) -> None:
    """Wait until the broker has every message queued by `sending`; raise the first failure.
    The producer has already retried what was retriable."""
    for outcome in await asyncio.gather(*await sending, return_exceptions=True):
        if isinstance(outcome, Exception):
            raise outcome


class Outcomes:
    """Sends final answers and dead letters through one producer."""

    def __init__(self, producer: AIOKafkaProducer, topics: Topics):
        self._producer = producer
        self._topics = topics
        self._partitions: dict[str, int] = {}

    async def partitions(self, topic: str) -> int:
        """How many partitions `topic` has (from the producer's metadata, fetched once)."""
        count = self._partitions.get(topic)
        if count is None:
            count = self._partitions[topic] = len(await self._producer.partitions_for(topic))
        return count

    async def send(self, topic: str, value: bytes, key: bytes | None, *, partition: int | None = None) -> asyncio.Future:
        """Queue one message. Never raises: a send that fails at once (unknown topic, too large)
        comes back as a failed future, like one the broker refuses later, so the caller
        decides per message instead of losing its whole batch."""
        try:
            return await self._producer.send(topic, value, key=key, partition=partition)
        except KafkaError as exc:
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    async def finish(self, request: InferenceRequest, result: InferenceResult, cost: CostRecord) -> list[asyncio.Future]:
        """Queue the result and its cost record; the returned futures resolve once the broker has both."""
        return [
            await self.reply(request, result),
            await self.send(self._topics.costs, encode(cost), cost_key(request.id)),
        ]

    async def reply(self, request: InferenceRequest, result: InferenceResult) -> asyncio.Future:
        return await self.send(self._topics.replies(request.reply_to), encode(result), reply_key(request.id))

    async def reject(self, request: InferenceRequest, status: Status, code: str, message: str,
                     **error) -> list[asyncio.Future]:
        """Answer a request that no model will run: an error result and a zero-cost record."""
        result = error_result(request, status, code, message, **error)
        return await self.finish(request, result, cost_record(request, result))

    async def dead_letter(self, record: ConsumerRecord, code: str, reason: str) -> list[asyncio.Future]:
        value = record.value or b""
        letter = DeadLetter(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason_code=code,
            reason=reason,
            ts_ms=now_ms(),
            payload=value[:DEAD_LETTER_PAYLOAD_CHARS].decode("utf-8", errors="replace"),
            payload_bytes=len(value),
        )
        log.warning("dead-lettered %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        metrics.DEAD_LETTERS.labels(record.topic, code).inc()
        return [await self.send(self._topics.dead_letter, encode(letter), record.key)]

    async def reply_error_to_sender(self, raw: object, code: str, message: str) -> list[asyncio.Future]:
        """Best effort for a message that failed validation: if it names an id and a reply
        topic, tell its sender why it was refused. A reply needs no cost record: nothing ran
        and the message never became a request."""
        if not isinstance(raw, dict):
            return []
        request_id, reply_to = raw.get("id"), raw.get("reply_to")
        if not (isinstance(request_id, str) and isinstance(reply_to, str)):
            return []
        if not re.fullmatch(NAME_PATTERN, reply_to) or len(request_id) > 128:
            return []
        result = InferenceResult(
            request_id=request_id,
            tenant=str(raw.get("tenant", ""))[:64],
            route=str(raw.get("route", ""))[:64],
            status=Status.rejected,
            cache_hit=CacheHit.none,
            error=ErrorInfo(code=code, message=message),
        )
        return [await self.send(self._topics.replies(reply_to), encode(result), reply_key(request_id))]
