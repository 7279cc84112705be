"""Which answers are scored: for a tenant and route with an eval suite, the suite's share of them,
picked by request id (a redelivered request is picked the same way), published to the samples
topic with the output, and the asked text only where the suite reads it. Never in the cost books."""

from __future__ import annotations

from schemas import InferenceResult, RoutedRequest, Status, now_ms
from schemas.quality import EvalSuite, Sample
from services.router.embed import asked_text
from services.worker.ledger import Sent
from shared.codec import encode
from shared.feed import CompactedFeed
from shared.suites import EVALUATOR_REPLY_TO, picked, suite_for
from shared.topics import Topics, sample_key


class Sampler:
    """Turns a worker's final answers into samples, following the suites topic."""

    def __init__(self, feed: CompactedFeed[EvalSuite], topics: Topics):
        self.feed = feed
        self._topics = topics

    def notes(self, routed: RoutedRequest, result: InferenceResult, model: str) -> tuple[Sent, ...]:
        request = routed.request
        if result.status != Status.ok or request.reply_to == EVALUATOR_REPLY_TO:
            return ()
        suite = suite_for(self.feed.values, request.tenant, request.route)
        if suite is None or not picked(request.id, suite.sample_rate):
            return ()
        sample = Sample(
            request_id=request.id, tenant=request.tenant, route=request.route, model=model,
            suite_version=suite.version, created_at_ms=request.created_at_ms, ts_ms=now_ms(),
            output=result.output, asked=asked_text(request) if suite.needs_input else None,
            tokens_out=result.tokens_out, latency_ms=result.latency.total_ms, confidence=result.confidence,
            escalated=routed.attempt > 0,
        )
        return (Sent(self._topics.samples, sample_key(request.id), encode(sample)),)
