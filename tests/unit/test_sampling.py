"""What a worker samples for scoring: only final ok answers on a tenant and route with a suite, at
its share, with the asked text only where the suite reads it, and never the evaluator's own calls."""

from __future__ import annotations

from types import SimpleNamespace

from schemas import InferenceRequest, InferenceResult, Latency, Status
from schemas.quality import EvalSuite, Sample
from services.router.decide import decide
from services.router.policy import parse
from services.worker.sampling import Sampler
from shared.codec import decode
from shared.suites import EVALUATOR_REPLY_TO
from shared.topics import Topics, suite_key

POLICIES = parse("""
version: "v1"
models:
  small: {tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.6}
routes:
  chat: {models: [small], max_output_tokens: 32}
  faq: {models: [small], max_output_tokens: 32}
""")
TOPICS = Topics("t")


def sampler(*suites: EvalSuite) -> Sampler:
    return Sampler(SimpleNamespace(values={suite_key(s.tenant, s.route): s for s in suites}), TOPICS)


def suite(rate: float = 1.0, **check) -> EvalSuite:
    return EvalSuite(tenant="acme", route="chat", version="2", sample_rate=rate,
                     checks=[{"kind": "length", "name": "l", "max_chars": 100, **check}])


def answer(route: str = "chat", status: Status = Status.ok, reply_to: str = "svc", tenant: str = "acme"):
    request = InferenceRequest(tenant=tenant, route=route, reply_to=reply_to,
                               messages=[{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "what is a refund?"}])
    result = InferenceResult(request_id=request.id, tenant=tenant, route=route, status=status, output="money back",
                             tokens_out=2, latency=Latency(total_ms=120), confidence=0.6)
    return decide(request, POLICIES), result


def test_an_answer_on_a_route_with_a_suite_is_sampled_without_its_question():
    routed, result = answer()
    (note,) = sampler(suite()).notes(routed, result, "small")
    assert note.topic == TOPICS.samples and note.key == routed.request.id.encode()
    sample = decode(Sample, note.value)
    assert sample.output == "money back" and sample.asked is None  # the suite does not read the input
    assert (sample.suite_version, sample.model, sample.latency_ms, sample.confidence) == ("2", "small", 120, 0.6)
    assert sample.created_at_ms == routed.request.created_at_ms and not sample.escalated


def test_the_question_travels_only_when_the_suite_reads_it():
    routed, result = answer()
    (note,) = sampler(suite(when_input_contains="refund")).notes(routed, result, "small")
    assert decode(Sample, note.value).asked == "what is a refund?"  # without the system prompt


def test_nothing_is_sampled_off_the_suite_or_its_share_or_for_failures_and_the_evaluator():
    s = sampler(suite())
    assert s.notes(*answer(route="faq"), "small") == ()
    assert s.notes(*answer(tenant="globex"), "small") == ()
    assert s.notes(*answer(status=Status.failed), "small") == ()
    assert s.notes(*answer(reply_to=EVALUATOR_REPLY_TO), "small") == ()
    assert sampler(suite(rate=0.0)).notes(*answer(), "small") == ()
    picked = sum(bool(sampler(suite(rate=0.25)).notes(*answer(), "small")) for _ in range(2000))
    assert 400 < picked < 600
