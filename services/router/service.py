"""The router: applies each route's policy to incoming requests and forwards them to a model topic.

Per batch: decode, refuse what is invalid, skip what was already forwarded, judge how hard each
request is (rules, then the learned classifier on the conversation's embedding), decide a model,
check tenant limits, answer from the exact or semantic cache or from an earlier identical
request where it can, forward the rest keyed by prefix hash, wait for the broker's
acknowledgement, record the forwarded ids, then commit. Committing last means a crash re-reads
the batch rather than losing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import orjson
from aiokafka.structs import ConsumerRecord, TopicPartition

from schemas import CacheHit, InferenceRequest, Memo, PolicySet, Priority, RoutedRequest, RoutePolicy, Status, now_ms
from services.router import metrics
from services.router.classify import HARD, Classifier, Verdict, rules
from services.router.affinity import Affinity
from services.router.decide import admit, decide, estimate_tokens, tiers_of
from services.router.embed import asked_text, asked_tokens, conversation_text
from services.router.feed import PolicyFeed
from services.router.gate import Ask, Gate, Passage
from services.router.health import HealthBoard
from services.router.limits import TenantLimiter
from services.router.priority import Lanes
from services.router.seen import ForwardedLog, content_digest
from shared import kafka
from shared import metrics as shared_metrics
from shared.codec import decode, encode, replaced
from shared.errors import InputError, UndecodableMessage
from shared.memory import Claim, Memory, cache_namespace, content_hash, exact_key, idempotency_key, replay
from shared.outcomes import Outcomes, cost_record, error_result
from shared.semantic import SemanticIndex, pack
from shared.guardrails import PatternIndex, redact_pii, screen_injection
from shared.semantic_guard import signature
from shared.topics import Topics

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.2
MAX_UNSETTLED = 4  # rounds whose answers may be on their way to the broker while the next is routed
RETRY_MAX_S = 10.0
MAX_REQUEST_BYTES = 1024 * 1024  # a request larger than this is dead-lettered unread


def _answered_before(p: _Pending, passage: Passage, found: tuple | None) -> bool:
    """Whether what would answer this request from memory (the exact cache, the semantic cache, or
    the idempotency record) is its own earlier answer: the request is then a redelivery of one the
    router forwarded but did not get to record, and a second answer would reach its sender twice."""
    first = (passage.hit if passage.state == "exact"
             else passage.claim.first if passage.claim is not None and passage.claim.state == "done"
             else found[0] if found is not None else None)
    return first is not None and first.request_id == p.request.id and first.tenant == p.request.tenant


class Router:
    def __init__(self, *, bootstrap: str, topics: Topics, policies: PolicySet, forwarded: ForwardedLog,
                 limiter: TenantLimiter, feed: PolicyFeed | None = None, group_id: str = "router",
                 max_batch: int = 500, classifier: Classifier | None = None, embedder=None,
                 memory: Memory | None = None, semantic: SemanticIndex | None = None, min_share: float = 0.1,
                 health: HealthBoard | None = None, static_embedder=None):
        self._bootstrap = bootstrap
        self._limiter = limiter
        self._gate = Gate(forwarded, limiter, memory)
        self._feed = feed
        self._topics = topics
        self.policies = policies
        self._forwarded = forwarded
        self._group_id = group_id
        self._max_batch = max_batch
        self._classifier = classifier or Classifier(None)
        self._embedder = embedder if embedder is not None else self._classifier.embedder
        self._patterns: PatternIndex | None = None  # known injections, embedded when a route first compares
        # Semantic caches embed with the embedder their route names (without the static one, MiniLM),
        # each in namespaces of its own: (name, embedder) by the policy's name.
        self._cache_embedders = {"minilm": ("minilm", self._embedder),
                                 "static": ("static", static_embedder) if static_embedder is not None
                                 else ("minilm", self._embedder)}
        self._memory = memory
        self._semantic = semantic if self._embedder is not None else None
        if semantic is not None and self._embedder is None:
            log.warning("no embedder: routes with a semantic cache are served without it")
        self._min_share = min_share
        self.health = health
        self._affinity = Affinity(health)
        self.lanes: Lanes | None = None
        self.counts: Counter[str] = Counter()
        self._tally = metrics.Tally()  # this batch's counts, for the Prometheus counters
        # (tenant, id) -> content digest of what this router answered or forwarded in rounds not yet
        # settled: the forwarded log learns of them only then.
        self._unsettled: dict[tuple[str, str], str] = {}

    def apply_policy(self, policies: PolicySet) -> None:
        """Swap the policy in force; the next batch is routed with it."""
        self.policies = policies
        log.info("policy version %s in force (routes: %s)", policies.version, ", ".join(policies.routes))

    async def run(self, stop: asyncio.Event) -> None:
        """Consume every priority's requests topic, each with a consumer of its own (group
        `<group_id>.<priority>`), most urgent first, until `stop` is set."""
        producer = kafka.producer(self._bootstrap)
        await producer.start()
        consumers: dict[Priority, object] = {}
        following = watching = None
        lag = []
        try:
            for priority in Priority:
                consumers[priority] = kafka.consumer(self._bootstrap, self._topics.requests(priority),
                                                     group_id=f"{self._group_id}.{priority.value}")
            # Started together: each joins its group (seconds on some brokers) at the same time.
            await asyncio.gather(*(c.start() for c in consumers.values()))
            log.info("router consuming %s with policy version %s (routes: %s)",
                     ", ".join(self._topics.all_requests), self.policies.version, ", ".join(self.policies.routes))
            following = asyncio.create_task(self._feed.follow(self.apply_policy, stop)) if self._feed else None
            watching = (asyncio.create_task(self.health.follow(self._bootstrap, self._topics, stop))
                        if self.health is not None else None)
            lag = [asyncio.create_task(shared_metrics.track_lag(c, f"{self._group_id}.{p.value}", stop))
                   for p, c in consumers.items()]
            self.lanes = Lanes(consumers, max_batch=self._max_batch, min_share=self._min_share)
            await self._consume(self.lanes, Outcomes(producer, self._topics), stop)
        finally:
            for task in (following, watching, *lag):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            for consumer in consumers.values():
                await consumer.stop()
            await producer.stop()

    async def _consume(self, lanes: Lanes, outcomes: Outcomes, stop: asyncio.Event) -> None:
        """Route round after round. A round's answers travel to the broker while the next rounds are
        routed (up to MAX_UNSETTLED rounds at once), and rounds are committed in order, each once its
        own answers and every earlier round's are acknowledged: waiting for the broker before taking
        the next round made the rounds, and so the wait behind each request's round, larger."""
        retry_s = RETRY_MIN_S
        unsettled: deque[_Round] = deque()
        try:
            while not stop.is_set():
                while unsettled and unsettled[0].settling.done():
                    if await self._close(unsettled, lanes):
                        retry_s = RETRY_MIN_S
                    else:
                        await asyncio.sleep(retry_s)
                        retry_s = min(retry_s * 2, RETRY_MAX_S)
                if len(unsettled) >= MAX_UNSETTLED:
                    await asyncio.wait([unsettled[0].settling])
                    continue
                rounds = await lanes.take()
                taken = time.perf_counter()
                records = [r for batch in rounds.values() for recs in batch.values() for r in recs]
                if not records:
                    continue
                answers, best_effort = await self._route(records, outcomes, taken)
                settling = asyncio.create_task(self._settle(answers, best_effort, outcomes))
                unsettled.append(_Round(rounds, settling, [a.entry for a in answers if a.entry is not None]))
        finally:
            # Stopping: what reached the broker is committed; what did not is read again by the next owner.
            while unsettled:
                await asyncio.gather(unsettled[0].settling, return_exceptions=True)
                if not await self._close(unsettled, lanes):
                    break

    async def _close(self, unsettled: deque[_Round], lanes: Lanes) -> bool:
        """Commit the oldest unsettled round once it settled; if it must be read again, wait for the
        later rounds too and read them all again, from the oldest one's first records."""
        done = unsettled.popleft()
        if done.settling.result():
            for priority, batch in done.rounds.items():
                if batch:
                    await kafka.commit(lanes.consumers[priority], {tp: recs[-1].offset + 1 for tp, recs in batch.items()})
            for tenant, request_id, _ in done.entries:
                self._unsettled.pop((tenant, request_id), None)
            return True
        # What did reach the broker is in the forwarded log and is skipped as a redelivery; the rest is sent again.
        await asyncio.gather(*(r.settling for r in unsettled), return_exceptions=True)
        first: dict[Priority, dict] = {}
        for r in (done, *unsettled):
            for priority, batch in r.rounds.items():
                for tp, recs in batch.items():
                    first.setdefault(priority, {}).setdefault(tp, recs[0].offset)
        unsettled.clear()
        self._unsettled.clear()
        for priority, offsets in first.items():
            kafka.rewind(lanes.consumers[priority], offsets)
        return False

    async def _route(self, records: list[ConsumerRecord], outcomes: Outcomes,
                     taken: float | None = None) -> tuple[list[_Answer], list[asyncio.Future]]:
        """Answer or forward each record of a batch; what was sent, to be settled."""
        try:
            return await self._route_batch(records, outcomes, taken)
        finally:
            self._tally.flush()

    async def _route_batch(self, records: list[ConsumerRecord], outcomes: Outcomes,
                           taken: float | None) -> tuple[list[_Answer], list[asyncio.Future]]:
        taken = time.perf_counter() if taken is None else taken
        answers: list[_Answer] = []
        best_effort: list[asyncio.Future] = []
        decoded: list[tuple[ConsumerRecord, InferenceRequest, str]] = []
        now = now_ms()
        for record in records:
            try:
                if record.value is not None and len(record.value) > MAX_REQUEST_BYTES:
                    raise _TooLarge(f"the message is {len(record.value)} bytes; requests may be at most "
                                    f"{MAX_REQUEST_BYTES}")
                request = decode(InferenceRequest, record.value)
                decoded.append((record, request, content_digest(record.value)))
                metrics.queue_wait(request.priority.value).observe(max(0, now - request.created_at_ms) / 1000)
            except UndecodableMessage as exc:
                self._count("", "dead_lettered")
                answers.append(_Answer(record, None, await outcomes.dead_letter(record, exc.code, str(exc))))
                raw = None if isinstance(exc, _TooLarge) else _loads_or_none(record.value)
                best_effort += await outcomes.reply_error_to_sender(raw, exc.code, str(exc))

        # What the router can tell of each request by itself: whether it is expired or invalid, how
        # hard it is, where it goes. A redelivery is only known after the gate's call below; its
        # decision is then dropped (the work is wasted only after a crash).
        candidates: list[_Pending] = []
        seen_in_batch: dict[tuple[str, str], str] = {}
        for record, request, digest in decoded:
            # A request of this batch, or of an earlier one not yet in the forwarded log.
            earlier = seen_in_batch.get((request.tenant, request.id)) or self._unsettled.get((request.tenant, request.id))
            if earlier == digest:
                self.counts["redelivered"] += 1
                continue
            if earlier is not None:
                answers.append(_Answer(record, None, [await self._duplicate_id(outcomes, request)]))
                continue
            seen_in_batch[(request.tenant, request.id)] = digest
            p = _Pending(record, request, (request.tenant, request.id, digest), 0, None)
            candidates.append(p)
            if request.deadline_unix_ms is not None and now_ms() > request.deadline_unix_ms:
                p.final = (Status.expired, "deadline_passed", "the request's deadline passed before it was routed")
                continue
            p.tokens_in = estimate_tokens(request)
            try:
                p.policy = admit(request, self.policies, p.tokens_in)
            except InputError as exc:
                p.final = (Status.rejected, exc.code, str(exc))
                continue
            if p.policy.guardrails.active:
                self._guard(p)
        judging = [p for p in candidates if p.final is None]
        await self._judge(judging)
        unhealthy = self.health.unhealthy(self.policies) if self.health is not None else {}
        for p in judging:
            try:
                p.routed = decide(p.request, self.policies, tokens_in=p.tokens_in,
                                  hard=p.verdict is not None and p.verdict.label == HARD,
                                  reasons=[p.verdict.reason] if p.verdict is not None else [],
                                  unhealthy=unhealthy)
            except InputError as exc:
                p.final = (Status.rejected, exc.code, str(exc))
                continue
            if p.guarded:
                p.routed = replaced(p.routed, reasons=[*p.routed.reasons, *p.guarded])

        forward = await self._through_gate(candidates, answers, outcomes)
        for p in forward:
            request, routed = p.request, p.routed
            self._count(request.route, "routed")
            self._tally.add(metrics.decisions, self._label(request.route), routed.tier or "", routed.model,
                            metrics.basis(routed.reasons[0]))
            try:
                value = encode(routed)
            except (TypeError, ValueError) as exc:  # a value the wire format cannot carry
                self._count(request.route, "dead_lettered")
                answers.append(_Answer(p.record, None, await outcomes.dead_letter(
                    p.record, "unencodable", f"the routed request cannot be encoded: {exc}")))
                continue
            topic = self._topics.model(routed.model)
            partition, spilled = self._affinity.choose(routed.model, routed.prefix_hash.encode(),
                                                       await outcomes.partitions(topic),
                                                       self.policies.models[routed.model].spill_backlog)
            if spilled:
                self.counts["spilled"] += 1
            sent = await outcomes.send(topic, value, routed.prefix_hash.encode(), partition=partition)
            metrics.DECISION_SECONDS.observe(time.perf_counter() - taken)
            answers.append(_Answer(p.record, p.entry, [sent]))
        for answer in answers:
            if answer.entry is not None:
                self._unsettled[answer.entry[:2]] = answer.entry[2]
        return answers, best_effort

    def _guard(self, p: _Pending) -> None:
        """The route's guardrails: refuse (p.final) what they block; redact personal data in place
        (p.request), noting it among the reasons that travel on to the result."""
        rails, request, route = p.policy.guardrails, p.request, self._label(p.request.route)
        messages = request.messages
        if rails.injection == "block":
            # System prompts are the product's own; what users and tools bring is screened.
            screened = [request.prompt] if messages is None else [m.content for m in messages
                                                                  if m.role in ("user", "tool")]
            similar = self._similarity(rails.injection_similarity)
            for text in screened:
                screen = screen_injection(text, **similar)
                if screen.blocked:
                    metrics.guardrails(route, "injection", "blocked").inc()
                    p.final = (Status.blocked, "prompt_injection",
                               f"the route's injection screen blocked this request ({screen.rule})")
                    return
            metrics.guardrails(route, "injection", "passed").inc()
        if rails.pii != "off":
            texts = [request.prompt] if messages is None else [m.content for m in messages]
            redactions = [redact_pii(text) for text in texts]
            found = Counter()
            for r in redactions:
                found.update(r.found)
            if not found:
                metrics.guardrails(route, "pii", "passed").inc()
                return
            kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(found.items()))
            if rails.pii == "block":
                metrics.guardrails(route, "pii", "blocked").inc()
                p.final = (Status.blocked, "pii_detected", f"the route accepts no personal data; found {kinds}")
                return
            metrics.guardrails(route, "pii", "redacted").inc()
            if messages is None:
                p.request = request.model_copy(update={"prompt": redactions[0].text})
            else:
                p.request = request.model_copy(update={"messages": [
                    m.model_copy(update={"content": r.text}) for m, r in zip(messages, redactions)]})
            p.guarded.append(f"guardrail: pii redacted ({kinds})")

    def _similarity(self, threshold: float | None) -> dict:
        """What screen_injection needs to compare with known injections too: nothing without a
        threshold or an embedder. The known ones are embedded once, when a route first asks."""
        if threshold is None or self._embedder is None:
            return {}
        if self._patterns is None:
            self._patterns = PatternIndex.load(embed=self._embedder.embed)
        return {"embed": self._embedder.embed, "patterns": self._patterns, "threshold": threshold}

    async def _duplicate_id(self, outcomes: Outcomes, request: InferenceRequest) -> asyncio.Future:
        # Answered, never booked: a cost record would carry the first request's identity.
        self._count(request.route, "rejected")
        result = error_result(request, Status.rejected, "duplicate_request_id",
                              f"request id {request.id!r} was already used for a different request")
        return await outcomes.reply(request, result)

    async def _judge(self, pending: list[_Pending]) -> None:
        """Set each request's verdict (how hard it is) and, for a semantic cache, its conversation's
        embedding and guard signature. The classifier reads what is asked (no system prompt) with
        MiniLM, the cache the whole conversation with the route's embedder; where a text and its
        embedder are the same, one embedding serves both."""
        texts: dict[object, dict[str, int]] = {}  # embedder -> text -> row

        def want(embedder, text: str) -> None:
            rows = texts.setdefault(embedder, {})
            rows.setdefault(text, len(rows))

        for p in pending:
            p.text = conversation_text(p.request)
            p.asked = asked_text(p.request)
            # Only a route with more than one tier has anything to choose; escalation decides alone.
            if not p.request.escalate and len(tiers_of(p.policy, self.policies)) > 1:
                p.verdict = rules(p.request, p.asked, p.tokens_in)
            if p.verdict is not None and p.verdict.label is None and self._classifier.model is not None:
                want(self._embedder, p.asked)
            if self._semantic is not None and p.policy.cache.semantic:
                kind, p.cache_embedder = self._cache_embedders[p.policy.cache.semantic_embedder]
                # The tenant's (or shared) namespace of the route, per embedder: vectors of two embedders never meet.
                p.semantic_namespace = f"{cache_namespace(p.request, p.policy)}:{kind}"
                want(p.cache_embedder, p.text)
        vectors = {}
        for embedder, rows in texts.items():
            started = time.perf_counter()
            if embedder is self._embedder:  # milliseconds a text: off the event loop
                vectors[embedder] = await asyncio.to_thread(embedder.embed, list(rows))
            else:  # microseconds a text
                vectors[embedder] = embedder.embed(list(rows))
            metrics.EMBED_SECONDS.observe(time.perf_counter() - started)
        for p in pending:
            if p.cache_embedder is not None:
                p.vector = vectors[p.cache_embedder][texts[p.cache_embedder][p.text]]
                p.signature = signature(p.text)
        undecided = [p for p in pending if p.verdict is not None and p.verdict.label is None]
        if undecided:
            asked = None
            if self._classifier.model is not None:
                asked = vectors[self._embedder][[texts[self._embedder][p.asked] for p in undecided]]
            for p, verdict in zip(undecided, self._classifier.classify(
                    [(p.request, p.asked, asked_tokens(p.request)) for p in undecided], asked)):
                p.verdict = verdict

    async def _through_gate(self, candidates: list[_Pending], answers: list[_Answer],
                            outcomes: Outcomes) -> list[_Pending]:
        """Ask the semantic cache (in memory) for the routes that have one, then pass the batch
        through the gate (one Redis call: redelivery check, tenant limits, exact cache, and the claim
        of what no cache answers), answer what a cache answers, and return what to forward."""
        semantic = [p for p in candidates if p.final is None and p.vector is not None and p.policy.cache.semantic]
        similar = self._semantic_lookups(semantic) if semantic else {}
        asks = []
        for p in candidates:
            if p.final is not None:
                asks.append(Ask(p.request, p.entry[2], go_on=False))
                continue
            content = None  # the content hash, worked out once for both keys
            if self._memory is not None and p.policy.cache.exact:
                content = content_hash(p.request)
                p.exact_key = exact_key(cache_namespace(p.request, p.policy), content)
            # A semantic hit is answered, not claimed: a repeat of it is answered by the cache too.
            claims = (self._memory is not None and p.policy.idempotency_window_s > 0
                      and similar.get(id(p)) is None)
            if claims:
                p.idem_key = idempotency_key(p.request, content)
            asks.append(Ask(p.request, p.entry[2], tokens=p.tokens_in + p.routed.request.sampling.max_tokens,
                            limits=self.policies.limits_for(p.request.tenant), exact_key=p.exact_key,
                            claim_window_s=p.policy.idempotency_window_s if claims else None, claim_key=p.idem_key))
        passages = await self._gate.check(asks)

        forward = []
        for p, passage in zip(candidates, passages):
            request, state, found = p.request, passage.state, similar.get(id(p))
            if state != "redelivered" and _answered_before(p, passage, found):
                # Forwarded and answered before this router recorded it (it died in between): what
                # memory holds is this very request's answer, which its sender has already.
                state = "redelivered"
            if state == "redelivered":
                self.counts["redelivered"] += 1
            elif state == "conflict":
                answers.append(_Answer(p.record, None, [await self._duplicate_id(outcomes, request)]))
            elif state == "final":
                status, code, message = p.final
                self._count(request.route, status.value)
                answers.append(_Answer(p.record, p.entry, await outcomes.reject(request, status, code, message)))
            elif state == "limited":
                # Not recorded as answered: the sender is told to retry, maybe with the same id.
                refusal = passage.refusal
                self._count(request.route, "rate_limited")
                answers.append(_Answer(p.record, None, await outcomes.reject(
                    request, Status.rejected, "rate_limited", refusal.message, retriable=refusal.retriable,
                    retry_after_ms=refusal.retry_after_ms)))
            else:
                if p.exact_key is not None:
                    self._tally.add(metrics.cache, self._label(request.route), "exact", "hit" if state == "exact" else "miss")
                if state != "exact" and id(p) in similar:
                    self._tally.add(metrics.cache, self._label(request.route), "semantic", "hit" if found else "miss")
                if state == "exact":
                    self._count(request.route, "cache_exact")
                    answers.append(_Answer(p.record, p.entry, await self._answer(
                        outcomes, request, passage.hit, CacheHit.exact)))
                elif found is not None:
                    self._count(request.route, "cache_semantic")
                    answers.append(_Answer(p.record, p.entry, await self._answer(
                        outcomes, request, found[0], CacheHit.semantic)))
                else:
                    await self._claimed(p, passage.claim, answers, outcomes, forward)
        return forward

    async def _claimed(self, p: _Pending, claim: Claim | None, answers: list[_Answer], outcomes: Outcomes,
                       forward: list[_Pending]) -> None:
        """Act on a request's idempotency claim (None: not claimed): answer it from the first request's
        result, leave it waiting for that result, or forward it."""
        if claim is not None and claim.state == "done":
            self._count(p.request.route, "repeat_answered")
            self._tally.add(metrics.cache, self._label(p.request.route), "idempotency", "hit")
            answers.append(_Answer(p.record, p.entry, await self._answer(
                outcomes, p.request, claim.first, CacheHit.idempotent)))
        elif claim is not None and claim.state == "waiting":
            # The worker running the first one answers this one too when it finishes.
            self._count(p.request.route, "repeat_waiting")
            self._tally.add(metrics.cache, self._label(p.request.route), "idempotency", "wait")
            answers.append(_Answer(p.record, p.entry, []))
        else:
            p.routed = replaced(p.routed, memo=self._memo(p, claim is not None))
            forward.append(p)

    def _semantic_lookups(self, candidates: list[_Pending]) -> dict[int, tuple | None]:
        """The semantic cache's answer for each candidate (by id), one lookup per namespace and threshold."""
        groups: dict[tuple[str, float], list[_Pending]] = {}
        for p in candidates:
            groups.setdefault((p.semantic_namespace, p.policy.cache.semantic_threshold), []).append(p)
        found = {}
        for (namespace, threshold), group in groups.items():
            answers = self._semantic.lookup_many(namespace, np.stack([p.vector for p in group]), threshold,
                                                 [p.signature for p in group])
            found.update(zip(map(id, group), answers))
        return found

    @staticmethod
    async def _answer(outcomes: Outcomes, request: InferenceRequest, first, kind: CacheHit) -> list[asyncio.Future]:
        result = replay(first, request, kind)
        return await outcomes.finish(request, result, cost_record(request, result))

    def _memo(self, p: _Pending, claimed: bool) -> Memo | None:
        cache = p.policy.cache
        semantic = p.vector is not None and cache.semantic
        if not (claimed or p.exact_key or semantic):
            return None
        return Memo(
            idempotency_key=(p.idem_key or idempotency_key(p.request)) if claimed else None,
            window_s=max(1, p.policy.idempotency_window_s),
            exact_key=p.exact_key,
            cache_ttl_s=cache.ttl_s,
            semantic_namespace=p.semantic_namespace if semantic else None,
            semantic_max_entries=cache.max_entries,
            embedding=pack(p.vector) if semantic else None,
            semantic_signature=p.signature if semantic else None,
        )

    def _count(self, route: str, outcome: str) -> None:
        self.counts[outcome] += 1
        self._tally.add(metrics.requests, self._label(route), outcome)

    def _label(self, route: str) -> str:
        """A sender may name any route (the default policy may serve it): only the policy's own
        routes become label values, so the metrics' cardinality stays bounded."""
        return route if route in self.policies.routes else metrics.UNKNOWN_ROUTE

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
                self.counts["undeliverable"] += 1
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
class _Round:
    """A round of records whose answers are on their way to the broker."""

    rounds: dict[Priority, dict[TopicPartition, list[ConsumerRecord]]]
    settling: asyncio.Task
    entries: list[tuple[str, str, str]]


@dataclass
class _Pending:
    """A request on its way through the batch: what the router has learned of it so far."""

    record: ConsumerRecord
    request: InferenceRequest
    entry: tuple[str, str, str]
    tokens_in: int
    policy: RoutePolicy | None
    text: str = ""
    asked: str = ""
    verdict: Verdict | None = None
    vector: np.ndarray | None = None
    cache_embedder: object | None = None
    semantic_namespace: str | None = None
    signature: str | None = None
    routed: RoutedRequest | None = None
    exact_key: str | None = None
    idem_key: str | None = None  # its idempotency key, once worked out for a claim
    final: tuple[Status, str, str] | None = None  # the answer the router gives it itself, if not forwarded
    guarded: list[str] = field(default_factory=list)  # what the route's guardrails did to it


class _TooLarge(UndecodableMessage):
    code = "message_too_large"


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
