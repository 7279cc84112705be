"""The router: applies each route's policy to incoming requests and forwards them to a model topic.

Per batch: decode, refuse what is invalid, skip what was already forwarded, decide a model,
forward keyed by prefix hash, wait for the broker's acknowledgement, record the forwarded
ids, then commit. Committing last means a crash re-reads the batch rather than losing it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

import orjson
from aiokafka.structs import ConsumerRecord

from schemas import InferenceRequest, PolicySet, RoutedRequest, Status, now_ms
from services.router.decide import decide, estimate_tokens
from services.router.feed import PolicyFeed
from services.router.limits import TenantLimiter
from services.router.seen import ForwardedLog, content_digest
from shared import kafka
from shared.codec import decode, encode
from shared.errors import InputError, UndecodableMessage
from shared.outcomes import Outcomes, error_result
from shared.prefix import prefix_hash
from shared.topics import Topics

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.2
RETRY_MAX_S = 10.0


class Router:
    def __init__(self, *, bootstrap: str, topics: Topics, policies: PolicySet, forwarded: ForwardedLog,
                 limiter: TenantLimiter, feed: PolicyFeed | None = None, group_id: str = "router",
                 max_batch: int = 500):
        self._bootstrap = bootstrap
        self._limiter = limiter
        self._feed = feed
        self._topics = topics
        self.policies = policies
        self._forwarded = forwarded
        self._group_id = group_id
        self._max_batch = max_batch
        self.counts: Counter[str] = Counter()

    def apply_policy(self, policies: PolicySet) -> None:
        """Swap the policy in force; the next batch is routed with it."""
        self.policies = policies
        log.info("policy version %s in force (routes: %s)", policies.version, ", ".join(policies.routes))

    async def run(self, stop: asyncio.Event) -> None:
        async with kafka.consuming(self._bootstrap, self._topics.all_requests, group_id=self._group_id) as (
            consumer, producer
        ):
            log.info("router consuming %s with policy version %s (routes: %s)",
                     ", ".join(self._topics.all_requests), self.policies.version, ", ".join(self.policies.routes))
            following = asyncio.create_task(self._feed.follow(self.apply_policy, stop)) if self._feed else None
            try:
                await self._consume(consumer, Outcomes(producer, self._topics), stop)
            finally:
                if following is not None:
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)

    async def _consume(self, consumer, outcomes: Outcomes, stop: asyncio.Event) -> None:
        retry_s = RETRY_MIN_S
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=self._max_batch)
            records = [r for recs in batch.values() for r in recs]
            if not records:
                continue
            if await self._route_batch(records, outcomes):
                await kafka.commit(consumer)
                retry_s = RETRY_MIN_S
            else:
                # Read the batch again: what did reach the broker is in the forwarded log
                # and is skipped as a redelivery; the rest is sent again.
                kafka.rewind(consumer, {tp: recs[0].offset for tp, recs in batch.items()})
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, RETRY_MAX_S)

    async def _route_batch(self, records: list[ConsumerRecord], outcomes: Outcomes) -> bool:
        """Route a batch; True once every record is answered or forwarded, False if it must be read again."""
        answers: list[_Answer] = []
        best_effort: list[asyncio.Future] = []
        decoded: list[tuple[ConsumerRecord, InferenceRequest, str]] = []
        for record in records:
            try:
                decoded.append((record, decode(InferenceRequest, record.value), content_digest(record.value)))
            except UndecodableMessage as exc:
                self.counts["dead_lettered"] += 1
                answers.append(_Answer(record, None, await outcomes.dead_letter(record, exc.code, str(exc))))
                best_effort += await outcomes.reply_error_to_sender(_loads_or_none(record.value), exc.code, str(exc))

        known = await self._forwarded.lookup([(r.tenant, r.id) for _, r, _ in decoded])
        admitted: list[tuple[ConsumerRecord, RoutedRequest, str, int]] = []
        seen_in_batch: dict[tuple[str, str], str] = {}
        for (record, request, digest), earlier in zip(decoded, known):
            earlier = earlier or seen_in_batch.get((request.tenant, request.id))
            if earlier == digest:
                self.counts["redelivered"] += 1
                continue
            entry = (request.tenant, request.id, digest)
            if earlier is not None:
                # Answered, never booked: a cost record would carry the first request's identity.
                self.counts["rejected"] += 1
                result = error_result(request, Status.rejected, "duplicate_request_id",
                                      f"request id {request.id!r} was already used for a different request")
                answers.append(_Answer(record, None, [await outcomes.reply(request, result)]))
                continue
            seen_in_batch[(request.tenant, request.id)] = digest
            if request.deadline_unix_ms is not None and now_ms() > request.deadline_unix_ms:
                self.counts["expired"] += 1
                answers.append(_Answer(record, entry, await outcomes.reject(
                    request, Status.expired, "deadline_passed", "the request's deadline passed before it was routed")))
                continue
            tokens_in = estimate_tokens(request)
            try:
                admitted.append((record, decide(request, self.policies, tokens_in=tokens_in), digest, tokens_in))
            except InputError as exc:
                self.counts["rejected"] += 1
                answers.append(_Answer(record, entry, await outcomes.reject(request, Status.rejected, exc.code, str(exc))))

        verdicts = await self._limiter.check([
            (r.request.tenant, tokens_in + r.request.sampling.max_tokens, self.policies.limits_for(r.request.tenant))
            for _, r, _, tokens_in in admitted
        ])
        for (record, routed, digest, _), refusal in zip(admitted, verdicts):
            request = routed.request
            if refusal is not None:
                # Not recorded as answered: the sender is told to retry, maybe with the same id.
                self.counts["rejected"] += 1
                answers.append(_Answer(record, None, await outcomes.reject(
                    request, Status.rejected, "rate_limited", refusal.message, retriable=refusal.retriable,
                    retry_after_ms=refusal.retry_after_ms)))
                continue
            self.counts["routed"] += 1
            sent = await outcomes.send(self._topics.model(routed.model), encode(routed), prefix_hash(request).encode())
            answers.append(_Answer(record, (request.tenant, request.id, digest), [sent]))

        return await self._settle(answers, best_effort, outcomes)

    async def _settle(self, answers: list[_Answer], best_effort: list[asyncio.Future], outcomes: Outcomes) -> bool:
        """Wait for the broker. A message it will never take (too large, topic missing) is dead-lettered
        and the batch goes on; a retriable failure means the batch is read again."""
        await asyncio.gather(*(f for a in answers for f in a.futures), return_exceptions=True)
        for failed in await asyncio.gather(*best_effort, return_exceptions=True):
            if isinstance(failed, Exception):
                log.warning("could not send an error reply to a sender: %r", failed)
        done, retry, undeliverable = [], [], []
        for answer in answers:
            errors = [f.exception() for f in answer.futures if f.exception() is not None]
            if not errors:
                if answer.entry is not None:
                    done.append(answer.entry)
            elif any(getattr(e, "retriable", False) for e in errors):
                retry.append(errors[0])
            else:
                undeliverable += await outcomes.dead_letter(answer.record, "undeliverable",
                                                            f"the broker refused its answer: {errors[0]!r}")
        await self._forwarded.record(done)
        for failed in await asyncio.gather(*undeliverable, return_exceptions=True):
            if isinstance(failed, Exception):
                retry.append(failed)
        if retry:
            log.warning("%d sends failed (first: %r); reading the batch again", len(retry), retry[0])
            return False
        return True


@dataclass
class _Answer:
    """What the router sent for one record, and what to note in the forwarded log once it is on the broker."""

    record: ConsumerRecord
    entry: tuple[str, str, str] | None
    futures: list[asyncio.Future]


def _loads_or_none(value: bytes | None):
    try:
        return orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        return None
