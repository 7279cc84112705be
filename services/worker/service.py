"""The worker: takes routed requests off its model topic, runs them on the engine many at a time,
and answers each with a result and a cost record."""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord

from schemas import InferenceResult, Latency, RoutedRequest, Status, now_ms
from services.worker.engine import Engine
from services.worker.offsets import OffsetTracker
from shared import kafka
from shared.codec import decode
from shared.errors import SwitchyardError, UndecodableMessage
from shared.outcomes import Outcomes, cost_record, error_result
from shared.topics import Topics

log = logging.getLogger(__name__)


class Worker:
    """One consumer in group `worker.<model>`, driving one engine."""

    def __init__(self, *, model: str, engine: Engine, bootstrap: str, topics: Topics,
                 max_in_flight: int = 64, commit_interval_s: float = 0.5, drain_grace_s: float = 30.0):
        self.model = model
        self._engine = engine
        self._bootstrap = bootstrap
        self._topics = topics
        self._max_in_flight = max_in_flight
        self._commit_interval_s = commit_interval_s
        self._drain_grace_s = drain_grace_s
        self._offsets = OffsetTracker()
        self._committed: dict = {}
        self._tasks: set[asyncio.Task] = set()
        self._consumer = None
        self.completed = 0

    async def run(self, stop: asyncio.Event) -> None:
        group = f"worker.{self.model}"
        async with kafka.consuming(self._bootstrap, [self._topics.model(self.model)], group_id=group,
                                   listener=_CommitOnRevoke(self)) as (consumer, producer):
            self._consumer = consumer
            log.info("worker for model %s consuming %s (up to %d in flight)",
                     self.model, self._topics.model(self.model), self._max_in_flight)
            await self._consume(consumer, Outcomes(producer, self._topics), stop)

    async def _consume(self, consumer, outcomes: Outcomes, stop: asyncio.Event) -> None:
        last_commit = time.monotonic()
        while not stop.is_set():
            free = self._max_in_flight - len(self._tasks)
            if free <= 0:
                # Full: stop fetching until a request finishes, so Kafka holds the backlog
                # instead of this process.
                await asyncio.wait(self._tasks, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
            else:
                batch = await consumer.getmany(timeout_ms=100, max_records=free)
                for tp, records in batch.items():
                    for record in records:
                        self._offsets.start(tp, record.offset)
                        task = asyncio.create_task(self._handle(record, outcomes))
                        self._tasks.add(task)
                        task.add_done_callback(lambda t, tp=tp, off=record.offset: self._done(t, tp, off))
            if time.monotonic() - last_commit >= self._commit_interval_s:
                await self._commit()
                last_commit = time.monotonic()
        await self._drain()

    def _done(self, task: asyncio.Task, tp, offset: int) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._offsets.finish(tp, offset)
            self.completed += 1
        elif not task.cancelled():
            # Left unfinished on purpose: its offset is not committed, so the request is
            # redelivered after a restart instead of being lost.
            log.error("request at %s@%d failed to publish: %r", tp, offset, task.exception())

    async def _commit(self, partitions=None) -> None:
        offsets = {tp: off for tp, off in self._offsets.committable().items()
                   if self._committed.get(tp) != off and (partitions is None or tp in partitions)}
        if offsets:
            await self._consumer.commit(offsets)
            self._committed.update(offsets)

    async def _drain(self) -> None:
        if self._tasks:
            log.info("draining %d requests in flight (grace %.0f s)", len(self._tasks), self._drain_grace_s)
            await asyncio.wait(self._tasks, timeout=self._drain_grace_s)
        await self._commit()

    async def _handle(self, record: ConsumerRecord, outcomes: Outcomes) -> None:
        try:
            routed = decode(RoutedRequest, record.value)
        except UndecodableMessage as exc:
            await asyncio.gather(*await outcomes.dead_letter(record, exc.code, str(exc)))
            return
        result, cost = await self._run(routed)
        await asyncio.gather(*await outcomes.finish(routed.request, result, cost))

    async def _run(self, routed: RoutedRequest):
        request = routed.request
        taken_ms = now_ms()
        if request.deadline_unix_ms is not None and taken_ms > request.deadline_unix_ms:
            result = error_result(request, Status.expired, "deadline_passed",
                                  "the request's deadline passed before a worker took it")
            return result, cost_record(request, result, attempt=routed.attempt)
        try:
            prompt_ids = self._engine.render(request)
            done = await self._engine.complete(request.id, prompt_ids, request, request.sampling.max_tokens)
        except SwitchyardError as exc:
            status = Status.rejected if exc.caller_fault else Status.failed
            result = error_result(request, status, exc.code, str(exc), retriable=exc.retriable)
            result = result.model_copy(update={"model": self.model})
            return result, cost_record(request, result, attempt=routed.attempt)
        finished_ms = now_ms()
        result = InferenceResult(
            request_id=request.id,
            tenant=request.tenant,
            route=request.route,
            status=Status.ok,
            output=done.text,
            finish_reason=done.finish_reason,
            model=self.model,
            tokens_in=done.tokens_in,
            tokens_out=done.tokens_out,
            cached_tokens=done.cached_tokens,
            latency=Latency(
                queue_ms=max(0, taken_ms - request.created_at_ms),
                ttft_ms=done.ttft_ms,
                total_ms=max(0, finished_ms - request.created_at_ms),
            ),
            escalation_path=[self.model],
        )
        cost = routed.price.cost_nano_usd(done.tokens_in, done.tokens_out)
        return result, cost_record(request, result, cost_nano_usd=cost, attempt=routed.attempt)


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Commits what is finished before partitions move to another worker."""

    def __init__(self, worker: Worker):
        self._worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        try:
            await self._worker._commit(set(revoked))
        except Exception as exc:  # a failed commit here only means redelivery, never loss
            log.warning("commit on revoke failed: %r", exc)
        self._worker._offsets.forget(revoked)
        self._worker._committed = {tp: o for tp, o in self._worker._committed.items() if tp not in revoked}

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
