"""The worker: takes routed requests off its model topic, runs them on the engine many at a time,
and answers each with a result and a cost record."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque

from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, TopicPartition

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import (CacheHit, ConfidenceCheck, ErrorInfo, InferenceResult, Latency, ModelHealth, RoutedRequest,
                     Status, StreamDelta, now_ms)
from services.worker import metrics
from services.worker.engine import Backend
from services.worker.ledger import Ledger, Outcome, Sent
from services.worker.offsets import OffsetTracker
from services.worker.output_check import PASSED, REFUSED, check_output
from services.worker.sampling import Sampler
from shared import kafka
from shared import metrics as shared_metrics
from shared import semantic
from shared.codec import decode, encode
from shared.memory import Memory, replay
from shared.errors import SwitchyardError, UndecodableMessage
from shared.outcomes import Outcomes, cost_record, delivered, error_result
from shared.topics import Topics, cost_key, reply_key

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 2.0
HEALTH_WINDOW_S = 60.0
# While full, poll (with every partition paused) at least this often, well inside the consumer's
# max.poll.interval, so the group never takes a busy worker for a dead one.
POLL_EVERY_S = 30.0


class Worker:
    """One consumer in group `worker.<model>`, driving one engine."""

    def __init__(self, *, model: str, engine: Backend, bootstrap: str, topics: Topics,
                 max_in_flight: int = 64, commit_interval_s: float = 0.5, drain_grace_s: float = 30.0,
                 redis: Redis | None = None, sampler: Sampler | None = None):
        self.model = model
        self._sampler = sampler
        self._redis = redis
        self._memory = Memory(redis) if redis is not None else None
        self._ledger = Ledger(redis) if redis is not None else None
        self.replayed = 0  # redelivered requests answered from the ledger
        self.handed_on = 0  # attempts handed to the next model (fallback or escalation)
        self._engine = engine
        self._bootstrap = bootstrap
        self._topics = topics
        self._max_in_flight = max_in_flight
        self._commit_interval_s = commit_interval_s
        self._drain_grace_s = drain_grace_s
        self._offsets = OffsetTracker()
        self._committed: dict[TopicPartition, int] = {}
        self._tasks: dict[asyncio.Task, TopicPartition] = {}
        self._running: dict[tuple[str, str, int], asyncio.Task] = {}  # the last copy taken of each attempt
        self._room = asyncio.Event()  # set when a request finishes: a slot is free
        self._consumer = None
        self._fatal: BaseException | None = None
        # (monotonic s, latency ms, failed, prompt tokens, of them from the prefix cache)
        self._finished: deque[tuple[float, int, bool, int, int]] = deque()
        self.health_interval_s = HEALTH_INTERVAL_S
        self._name = f"{socket.gethostname()}:{os.getpid()}"
        self._fetched = shared_metrics.CONSUMER_BATCH.labels(f"worker.{model}")
        self._in_flight = metrics.IN_FLIGHT.labels(model)
        metrics.CAPACITY.labels(model).set(max_in_flight)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (then drain) or the engine dies (then raise, committing nothing more)."""
        group = f"worker.{self.model}"
        async with kafka.consuming(self._bootstrap, [self._topics.model(self.model)], group_id=group,
                                   listener=_CommitOnRevoke(self)) as (consumer, producer):
            self._consumer = consumer
            log.info("worker for model %s consuming %s (up to %d in flight)",
                     self.model, self._topics.model(self.model), self._max_in_flight)
            side = [asyncio.create_task(self._report_health(producer, stop)),
                    asyncio.create_task(shared_metrics.track_lag(consumer, group, stop))]
            if self._sampler is not None:
                side.append(asyncio.create_task(self._sampler.feed.follow(None, stop)))
            try:
                await self._consume(consumer, Outcomes(producer, self._topics), stop)
            finally:
                for task in side:
                    task.cancel()
                await asyncio.gather(*side, return_exceptions=True)
        if self._fatal is not None:
            raise self._fatal

    async def _consume(self, consumer, outcomes: Outcomes, stop: asyncio.Event) -> None:
        last_commit = last_poll = time.monotonic()
        while not stop.is_set() and self._fatal is None:
            if time.monotonic() - last_commit >= self._commit_interval_s:
                await self._commit()
                last_commit = time.monotonic()
            free = self._max_in_flight - len(self._tasks)
            if free <= 0:
                # Full: wait for a request to finish, and take the next one the moment one does.
                # The consumer's prefetch stays buffered (bounded by its fetch sizes) and Kafka
                # holds the rest. Heartbeats run on their own; a poll now and then, with every
                # partition paused so nothing comes back, keeps max.poll.interval from expiring.
                self._room.clear()
                try:
                    await asyncio.wait_for(self._room.wait(), timeout=1.0)
                except TimeoutError:
                    if time.monotonic() - last_poll > POLL_EVERY_S:
                        assigned = consumer.assignment()
                        consumer.pause(*assigned)
                        await consumer.getmany(timeout_ms=0)
                        consumer.resume(*assigned)
                        last_poll = time.monotonic()
                continue
            batch = await consumer.getmany(timeout_ms=100, max_records=free)
            last_poll = time.monotonic()
            if batch:
                self._fetched.observe(sum(len(records) for records in batch.values()))
            for tp, records in batch.items():
                for record in records:
                    self._offsets.start(tp, record.offset)
                    task = asyncio.create_task(self._handle(record, outcomes))
                    self._tasks[task] = tp
                    task.add_done_callback(lambda t, off=record.offset: self._done(t, off))
            self._in_flight.set(len(self._tasks))
        if self._fatal is None:
            await self._drain()
        else:
            for task in self._tasks:
                task.cancel()

    def _done(self, task: asyncio.Task, offset: int) -> None:
        tp = self._tasks.pop(task)
        self._in_flight.set(len(self._tasks))
        self._room.set()
        if task.cancelled():
            return
        if task.exception() is None:
            self._offsets.finish(tp, offset)
            return
        # Its offset stays uncommitted, so Kafka redelivers the request once this worker
        # is replaced; nothing more is committed from here on.
        log.error("worker stopping: request at %s[%d]@%d could not finish: %r",
                  tp.topic, tp.partition, offset, task.exception())
        self._fatal = self._fatal or task.exception()

    async def _commit(self, partitions=None) -> None:
        if self._fatal is not None:
            return
        offsets = {tp: off for tp, off in self._offsets.committable().items()
                   if self._committed.get(tp) != off and (partitions is None or tp in partitions)}
        if offsets and await kafka.commit(self._consumer, offsets):
            self._committed.update(offsets)

    async def _drain(self, partitions=None) -> None:
        """Let the requests in flight (of `partitions`, or all) finish within the grace, then commit."""
        tasks = [t for t, tp in self._tasks.items() if partitions is None or tp in partitions]
        if tasks:
            log.info("draining %d requests in flight (grace %.0f s)", len(tasks), self._drain_grace_s)
            _, late = await asyncio.wait(tasks, timeout=self._drain_grace_s)
            if late:
                # Their offsets stay uncommitted: the partition's next owner runs them. Stopped here,
                # none of them can answer as well once the grace is over, which would answer twice.
                log.warning("%d requests did not finish within the grace; stopping them for the next "
                            "owner of their partitions to run", len(late))
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        await self._commit(partitions)

    async def _handle(self, record: ConsumerRecord, outcomes: Outcomes) -> None:
        try:
            routed = decode(RoutedRequest, record.value)
        except UndecodableMessage as exc:
            await delivered(outcomes.dead_letter(record, exc.code, str(exc)))
            return
        key = (routed.request.tenant, routed.request.id, routed.attempt)
        earlier = self._running.get(key)
        me = self._running[key] = asyncio.current_task()
        try:
            if earlier is not None:
                # A second copy of an attempt this worker is running: a router that died after
                # forwarding it, before recording that, forwards it again. It waits for the first
                # copy to end and is then answered as any redelivery is: from the ledger.
                log.info("request %s attempt %d is here twice; the second copy waits for the first",
                         routed.request.id, routed.attempt)
                await asyncio.wait([earlier])
            await self._answer_once(routed, outcomes)
        finally:
            if self._running.get(key) is me:
                del self._running[key]

    async def _answer_once(self, routed: RoutedRequest, outcomes: Outcomes) -> None:
        request = routed.request
        outcome = await self._ledger.get(request.tenant, request.id, routed.attempt) if self._ledger is not None else None
        if outcome is not None and outcome.delivered:
            # Redelivered after its answer reached the broker (its offset was not committed yet):
            # the reply topic holds it already; sending it again would only answer twice. The
            # repeats that waited for it are answered still, in case that worker stopped before.
            log.info("request %s attempt %d was answered before; nothing to send again", request.id, routed.attempt)
            metrics.REPLAYED.labels(self.model, "delivered").inc()
        elif outcome is not None:
            # Redelivered after this attempt had ended (its worker died or lost the partition
            # before committing): answer from the record, run nothing, bill nothing new.
            log.info("request %s attempt %d ended before; sending its recorded outcome again",
                     request.id, routed.attempt)
            self.replayed += 1
            metrics.REPLAYED.labels(self.model, "resent").inc()
        else:
            outcome = await self._attempt(routed, outcomes)
            if self._ledger is not None:
                await self._ledger.put(request.tenant, request.id, routed.attempt, outcome)
        if not outcome.delivered:
            await delivered(self._send_all(outcomes, outcome.messages))
            if self._ledger is not None:
                await self._ledger.mark_delivered(request.tenant, request.id, routed.attempt)
        if outcome.notes:
            try:
                await delivered(self._send_all(outcomes, list(outcome.notes)))
            except Exception as exc:  # noqa: BLE001 - a lost note must never cost an answer
                log.warning("could not send a note on %s: %r", request.id, exc)
        if outcome.final and routed.memo is not None and self._memory is not None:
            result = outcome.result or decode(InferenceResult, outcome.messages[0].value)
            await self._remember(routed, result, outcomes)

    @staticmethod
    async def _send_all(outcomes: Outcomes, messages: list[Sent]) -> list[asyncio.Future]:
        return [await outcomes.send(m.topic, m.value, m.key) for m in messages]

    async def _attempt(self, routed: RoutedRequest, outcomes: Outcomes) -> Outcome:
        """Run this attempt and say how it ends: answered here, or handed to the next model."""
        request = routed.request
        on_text = self._streamer(routed, outcomes) if request.stream else None
        result, cost, moves_on = await self._run(routed, on_text)
        hop, why = self._next_hop(routed, result, moves_on)
        check = self._confidence_check(routed, result, escalated=hop is not None and not moves_on)
        self._count(routed, result, cost, hop, moves_on, checked=bool(check))
        if hop is None:
            sampled = self._sampler.notes(routed, result, self.model) if self._sampler is not None else ()
            return Outcome(final=True, messages=[
                Sent(self._topics.replies(request.reply_to), reply_key(request.id), encode(result)),
                Sent(self._topics.costs, cost_key(request.id), encode(cost)),
            ], notes=check + sampled, result=result)
        index = routed.fallbacks.index(hop)
        onward = routed.model_copy(update={
            "model": hop.model, "price": hop.price, "rank": hop.rank, "attempt": routed.attempt + 1,
            "fallbacks": routed.fallbacks[index + 1:], "escalation_path": [*routed.escalation_path, self.model],
            "reasons": [*routed.reasons, why],
        })
        log.info("request %s: %s; handing it to %s", request.id, why, hop.model)
        self.handed_on += 1
        return Outcome(final=False, messages=[
            Sent(self._topics.model(hop.model), (routed.prefix_hash or request.id).encode(), encode(onward)),
            Sent(self._topics.costs, cost_key(request.id), encode(cost)),
        ], notes=check)

    def _count(self, routed: RoutedRequest, result: InferenceResult, cost, hop, moves_on: bool, *,
               checked: bool) -> None:
        route, model = shared_metrics.route_label(routed.request.route), self.model
        metrics.REQUESTS.labels(route, model, "handed_on" if hop is not None else result.status.value).inc()
        if hop is not None:
            metrics.HANDOFFS.labels(route, model, "moved_on" if moves_on else "confidence").inc()
        if result.tokens_in or result.tokens_out:
            metrics.TOKENS.labels(route, model, "prompt").inc(result.tokens_in)
            metrics.TOKENS.labels(route, model, "completion").inc(result.tokens_out)
            metrics.TOKENS.labels(route, model, "cached").inc(result.cached_tokens)
        if cost.cost_nano_usd:
            metrics.COST.labels(route, model).inc(cost.cost_nano_usd / 1e9)
        if checked:
            metrics.CONFIDENCE.labels(route, model).observe(result.confidence)
        if hop is None and result.status == Status.ok and result.latency.total_ms:
            metrics.TOTAL.labels(route, model).observe(result.latency.total_ms / 1000)

    def _confidence_check(self, routed: RoutedRequest, result: InferenceResult, *, escalated: bool) -> tuple[Sent, ...]:
        """The record of a confidence check, where one was made: the router learns from them."""
        if _checked_for(routed, result) is None:
            return ()
        check = ConfidenceCheck(request=routed.request, model=self.model, confidence=result.confidence,
                                threshold=routed.escalate_below, escalated=escalated, ts_ms=now_ms())
        return (Sent(self._topics.escalations, routed.request.id.encode(), encode(check)),)

    def _next_hop(self, routed: RoutedRequest, result: InferenceResult, moves_on: bool):
        """The fallback that should take the request after this attempt, and why; (None, "") for none."""
        if moves_on and routed.fallbacks:
            code = result.error.code if result.error else result.status.value
            return routed.fallbacks[0], f"{self.model} failed ({code}): moved on to the next model"
        stronger = _checked_for(routed, result)
        if stronger is not None and result.confidence < routed.escalate_below:
            return stronger, (f"escalated: confidence {result.confidence:.3f} from {self.model} "
                              f"is below the route's {routed.escalate_below}")
        return None, ""

    def _streamer(self, routed: RoutedRequest, outcomes: Outcomes):
        """Publishes the text as it comes on the reply topic, keyed like the result so it comes first."""
        request = routed.request
        topic, key = self._topics.replies(request.reply_to), reply_key(request.id)
        seq = 0

        async def on_text(text: str) -> None:
            nonlocal seq
            delta = StreamDelta(request_id=request.id, seq=seq, text=text, model=self.model, attempt=routed.attempt)
            seq += 1
            await outcomes.send(topic, encode(delta), key)  # best effort: the result carries the whole text

        return on_text

    async def _remember(self, routed: RoutedRequest, result: InferenceResult, outcomes: Outcomes) -> None:
        """Store the result for repeats and caches, and answer the repeats that waited for it."""
        memo = routed.memo
        waiters = await self._memory.complete(routed, result)
        if result.status == Status.ok and memo.semantic_namespace and memo.embedding and memo.semantic_signature:
            try:
                await semantic.publish(self._redis, memo.semantic_namespace, memo.embedding,
                                       memo.semantic_signature, encode(result),
                                       memo.cache_ttl_s, memo.semantic_max_entries)
            except RedisError as exc:
                log.warning("could not offer %s to the semantic cache: %s", routed.request.id, exc)
        for waiter in waiters:
            answer = replay(result, waiter, CacheHit.idempotent)
            await delivered(outcomes.finish(waiter, answer, cost_record(waiter, answer)))
        await self._memory.answered(routed, len(waiters))

    async def _run(self, routed: RoutedRequest, on_text=None):
        started = time.monotonic()
        result, cost, moves_on = await self._execute(routed, on_text)
        if result.status in (Status.ok, Status.failed):
            self._finished.append((time.monotonic(), int((time.monotonic() - started) * 1000),
                                   result.status == Status.failed, result.tokens_in, result.cached_tokens))
        return result, cost, moves_on

    def health(self, partition_backlog: dict[int, int]) -> ModelHealth:
        """This worker's report: the last HEALTH_WINDOW_S of finished requests and its load now."""
        horizon = time.monotonic() - HEALTH_WINDOW_S
        while self._finished and self._finished[0][0] < horizon:
            self._finished.popleft()
        latencies = sorted(entry[1] for entry in self._finished)
        prompt_tokens = sum(entry[3] for entry in self._finished)
        load = self._engine.load()
        return ModelHealth(
            model=self.model, worker=self._name, ts_ms=now_ms(), interval_s=self.health_interval_s,
            window_s=HEALTH_WINDOW_S, requests=len(latencies), errors=sum(1 for e in self._finished if e[2]),
            p95_latency_ms=latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
            in_flight=len(self._tasks), capacity=self._max_in_flight, backlog=sum(partition_backlog.values()),
            partition_backlog=partition_backlog, kv_usage=load.get("kv_usage"),
            prefix_hit_rate=sum(entry[4] for entry in self._finished) / prompt_tokens if prompt_tokens else None,
        )

    async def _report_health(self, producer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                backlog = {tp.partition: waiting for tp, waiting in (await kafka.lag(self._consumer)).items()}
                await producer.send(self._topics.health, encode(self.health(backlog)), key=self.model.encode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a missed report must never stop the worker
                log.warning("could not send a health report: %r", exc)
            await asyncio.sleep(self.health_interval_s)

    async def _execute(self, routed: RoutedRequest, on_text=None):
        """Run the request on the backend: (result, cost record, whether the next model should take it)."""
        request = routed.request
        taken_ms = now_ms()
        metrics.QUEUE_WAIT.labels(self.model).observe(max(0, taken_ms - request.created_at_ms) / 1000)
        if request.deadline_unix_ms is not None and taken_ms > request.deadline_unix_ms:
            result = error_result(request, Status.expired, "deadline_passed",
                                  "the request's deadline passed before a worker took it")
            return self._stamp(result, routed), cost_record(request, result, attempt=routed.attempt), False
        # Unique in the engine even when two tenants chose the same request id.
        engine_id = f"{request.tenant}:{request.id}:{routed.attempt}"
        check = None
        try:
            done = await self._engine.run(request, request_id=engine_id, max_tokens=request.sampling.max_tokens,
                                          deadline_ms=request.deadline_unix_ms, on_text=on_text)
            if request.response_schema is not None and not done.expired:
                check = await check_output(self._engine, request, done, request_id=engine_id)
                done = check.completion
                metrics.OUTPUT_CHECKS.labels(shared_metrics.route_label(request.route), self.model, check.outcome).inc()
        except SwitchyardError as exc:
            if exc.fatal:
                raise
            status = Status.rejected if exc.caller_fault else Status.failed
            result = error_result(request, status, exc.code, str(exc), retriable=exc.retriable,
                                  retry_after_ms=getattr(exc, "retry_after_ms", None))
            result = self._stamp(result.model_copy(update={"model": self.model}), routed)
            return result, cost_record(request, result, attempt=routed.attempt), exc.moves_on
        finished_ms = now_ms()
        if done.ttft_ms is not None:
            metrics.TTFT.labels(self.model).observe(done.ttft_ms / 1000)
        metrics.GENERATION.labels(self.model).observe(max(0, finished_ms - taken_ms) / 1000)
        refused = check is not None and check.outcome == REFUSED
        stamp = self._stamped(routed)
        if check is not None and check.outcome != PASSED:
            stamp["route_reasons"] = [*stamp["route_reasons"], f"output {check.outcome}: {check.reason}"]
        result = InferenceResult(
            request_id=request.id,
            tenant=request.tenant,
            route=request.route,
            status=Status.expired if done.expired else Status.failed if refused else Status.ok,
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
            confidence=done.confidence,
            error=ErrorInfo(code="deadline_passed", message=(
                f"the deadline passed during generation; stopped after {done.tokens_out} tokens")) if done.expired
            else ErrorInfo(code="invalid_output", message=(
                f"the answer is not JSON of the request's schema, also after one repair: {check.reason}")) if refused
            else None,
            **stamp,
        )
        # What ran is billed, also when the deadline cut it short or the answer was refused. A refused
        # answer may go to the next model of the chain, which may well write the JSON asked for.
        cost = routed.price.cost_nano_usd(done.tokens_in, done.tokens_out)
        return result, cost_record(request, result, cost_nano_usd=cost, attempt=routed.attempt), refused

    def _stamped(self, routed: RoutedRequest) -> dict:
        """What every result of this attempt carries from the routing: tier, reasons, the models so far."""
        return {"tier": routed.tier, "route_reasons": routed.reasons,
                "escalation_path": [*routed.escalation_path, self.model]}

    def _stamp(self, result: InferenceResult, routed: RoutedRequest) -> InferenceResult:
        return result.model_copy(update=self._stamped(routed))


def _checked_for(routed: RoutedRequest, result: InferenceResult):
    """The stronger model a confident-enough check would escalate to, where the answer is to be
    checked at all (the route sets a threshold, the answer is ok and scored); else None."""
    if routed.escalate_below is None or result.status != Status.ok or result.confidence is None:
        return None
    return next((h for h in routed.fallbacks if h.rank > routed.rank), None)


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Before partitions move to another worker, lets their requests finish and commits them, so the
    new owner does not run them a second time."""

    def __init__(self, worker: Worker):
        self._worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        revoked = set(revoked)
        await self._worker._drain(revoked)
        self._worker._offsets.forget(revoked)
        self._worker._committed = {tp: o for tp, o in self._worker._committed.items() if tp not in revoked}

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
