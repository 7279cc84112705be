"""The JSON output check with one repair, against a small fake backend that answers from a script."""

from __future__ import annotations

import pytest

from schemas import ChatMessage, InferenceRequest, ModelPrice, RoutedRequest, Sampling, Status
from services.worker.engine import Completion
from services.worker.output_check import PASSED, REFUSED, REPAIRED, check_output, repair_request
from services.worker.service import Worker
from shared.topics import Topics

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


class Scripted:
    """Answers each run with the next text of its script, and keeps what it was asked."""

    def __init__(self, *texts: str, expire_at: int | None = None):
        self.texts, self.asked, self._expire_at = list(texts), [], expire_at

    async def run(self, request, *, request_id, max_tokens, deadline_ms=None, on_text=None) -> Completion:
        self.asked.append((request, request_id))
        return Completion(text=self.texts.pop(0), finish_reason="stop", tokens_in=10 * len(self.asked), tokens_out=4,
                          cached_tokens=2, ttft_ms=5 if len(self.asked) == 1 else 50,
                          expired=len(self.asked) == self._expire_at)

    def load(self):
        return {"kv_usage": None}


def _request(**fields) -> InferenceRequest:
    base = dict(tenant="acme", route="json", reply_to="r", response_schema=SCHEMA, sampling=Sampling(max_tokens=8),
                messages=[ChatMessage(role="user", content="Where is the Eiffel tower? Answer in JSON.")])
    return InferenceRequest(**(base | fields))


async def _check(backend, request=None):
    request = request or _request()
    first = await backend.run(request, request_id="acme:1:0", max_tokens=8)
    return await check_output(backend, request, first, request_id="acme:1:0")


async def test_valid_json_passes_without_a_second_call():
    backend = Scripted('{"city": "Paris"}')
    checked = await _check(backend)
    assert (checked.outcome, checked.reason, checked.completion.text) == (PASSED, None, '{"city": "Paris"}')
    assert len(backend.asked) == 1


async def test_a_wrong_answer_is_repaired_once_through_the_same_model_and_both_calls_count():
    backend = Scripted("Paris, of course.", '```json\n{"city": "Paris"}\n```')
    checked = await _check(backend)
    assert checked.outcome == REPAIRED and checked.reason.startswith("not JSON")
    assert checked.completion.text.endswith("```")
    # Billed for both calls; the first token came with the first call.
    assert (checked.completion.tokens_in, checked.completion.tokens_out, checked.completion.cached_tokens) == (30, 8, 4)
    assert checked.completion.ttft_ms == 5
    repair, repair_id = backend.asked[1]
    assert repair_id == "acme:1:0:repair" and not repair.stream
    assert [m.role for m in repair.messages] == ["user", "assistant", "user"]
    assert repair.messages[1].content == "Paris, of course."
    assert "could not be used: not JSON" in repair.messages[2].content and '"required": ["city"]' in repair.messages[2].content


async def test_an_answer_still_wrong_after_the_repair_is_refused_with_why():
    checked = await _check(Scripted("Paris", '{"town": "Paris"}'))
    assert checked.outcome == REFUSED and "city" in checked.reason


async def test_a_repair_the_deadline_cuts_short_is_refused_and_expired():
    checked = await _check(Scripted("Paris", '{"ci', expire_at=2))
    assert checked.outcome == REFUSED and checked.completion.expired
    assert checked.reason == "the deadline passed during the repair"


def test_a_completion_request_is_repaired_as_a_conversation():
    repair = repair_request(_request(messages=None, prompt="Name a city as JSON."), "Rome", "not JSON: Expecting value")
    assert repair.prompt is None and [m.content for m in repair.messages][:2] == ["Name a city as JSON.", "Rome"]


def _routed(request: InferenceRequest) -> RoutedRequest:
    return RoutedRequest(request=request, model="small", price=ModelPrice(in_nano_usd_per_token=100,
                         out_nano_usd_per_token=1000), policy_version="v", received_at_ms=request.created_at_ms)


@pytest.mark.parametrize("script, status, moves_on", [
    (('{"city": "Paris"}',), Status.ok, False),
    (("Paris", '{"city": "Paris"}'), Status.ok, False),
    (("Paris", "Still Paris"), Status.failed, True),
])
async def test_the_worker_answers_bills_and_hands_on_by_the_check(script, status, moves_on):
    worker = Worker(model="small", engine=Scripted(*script), bootstrap="127.0.0.1:1", topics=Topics("unit"))
    result, cost, hand_on = await worker._execute(_routed(_request()))
    assert (result.status, hand_on) == (status, moves_on)
    assert (result.tokens_in, result.tokens_out) == (cost.tokens_in, cost.tokens_out)
    assert cost.cost_nano_usd == result.tokens_in * 100 + result.tokens_out * 1000
    if len(script) == 2:
        assert any(r.startswith("output repaired" if status == Status.ok else "output refused")
                   for r in result.route_reasons)
    if status == Status.failed:
        assert result.error.code == "invalid_output" and result.output == "Still Paris"


async def test_requests_without_a_schema_are_not_checked():
    worker = Worker(model="small", engine=Scripted("plain words"), bootstrap="127.0.0.1:1", topics=Topics("unit"))
    result, _, _ = await worker._execute(_routed(_request(response_schema=None)))
    assert result.status == Status.ok and result.output == "plain words"
