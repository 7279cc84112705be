"""The drills' checks catch what they promise to catch: a lost request, two answers that
disagree, a request billed twice or not at all, books that differ from the answers. Fed with
hand-made replies and real rows in the session's ClickHouse engine."""

from __future__ import annotations

import time
import uuid

import pytest

from schemas import CacheHit, ChatMessage, CostRecord, InferenceRequest, InferenceResult, Status
from services.chaos import checks
from services.chaos.load import Load, Reply, Sent
from shared.codec import encode
from shared.topics import Topics

pytestmark = pytest.mark.integration


def _load(run: str) -> Load:
    return Load("127.0.0.1:1", Topics("checks"), run)


def _send(load: Load, scenario: str, n: int) -> InferenceRequest:
    request = InferenceRequest(id=f"{load.run}-{scenario}-{n}", tenant="acme", route="chat", reply_to="chaos",
                               messages=[ChatMessage(role="user", content="hi")])
    load.sent[request.id] = Sent(request, scenario, time.monotonic())
    return request


def _answer(load: Load, request: InferenceRequest, *, output="fine", model="small", tokens=(10, 5),
            path=("small",), cache_hit=CacheHit.none) -> InferenceResult:
    result = InferenceResult(request_id=request.id, tenant=request.tenant, route=request.route, status=Status.ok,
                             output=output, model=model, tokens_in=tokens[0], tokens_out=tokens[1],
                             escalation_path=list(path), cache_hit=cache_hit)
    load.replies.setdefault(request.id, []).append(Reply(time.monotonic(), encode(result), result))
    return result


def _book(store, request: InferenceRequest, result: InferenceResult, policies, attempt=0, model=None, times=1):
    model = model or result.model
    cost = policies.models[model].price.cost_nano_usd(result.tokens_in, result.tokens_out) if model else 0
    record = CostRecord(request_id=request.id, attempt=attempt, ts_ms=request.created_at_ms, tenant=request.tenant,
                        route=request.route, model=model or "", priority="standard", status=result.status,
                        cache_hit=result.cache_hit, tokens_in=result.tokens_in, tokens_out=result.tokens_out,
                        cost_nano_usd=cost, latency_ms=5)
    for _ in range(times):
        store.insert([record])


def test_answers_count_lost_duplicate_and_conflicting_replies():
    load = _load("a")
    lost = _send(load, "s", 0)
    twice_same = _send(load, "s", 1)
    first = _answer(load, twice_same)
    load.replies[twice_same.id].append(Reply(time.monotonic(), b"", first.model_copy(update={"latency": first.latency})))
    twice_other = _send(load, "s", 2)
    _answer(load, twice_other, output="one")
    _answer(load, twice_other, output="another")
    row = checks.answers(load, "s")
    assert (row["sent"], row["answered"], row["lost"]) == (3, 2, 1)
    assert (row["duplicate_replies"], row["conflicting_replies"]) == (2, 1)
    assert lost.id not in load.replies


def test_books_against_answers(store, policies):
    load = _load(uuid.uuid4().hex[:8])
    fine = _send(load, "s", 0)
    _book(store, fine, _answer(load, fine), policies, times=2)  # read twice by the sink: counted once
    handed_on = _send(load, "s", 1)
    answer = _answer(load, handed_on, path=("flaky", "small"))
    _book(store, handed_on, answer.model_copy(update={"tokens_in": 0, "tokens_out": 0}), policies, model="flaky")
    _book(store, handed_on, answer, policies, attempt=1)
    from_cache = _send(load, "s", 2)
    _book(store, from_cache, _answer(load, from_cache, model=None, path=(), cache_hit=CacheHit.exact), policies)
    row = checks.books(store, load, ["s"], policies)["s"]
    assert row["double_billed"] == row["unbilled"] == row["billed_unlike_answer"] == 0
    assert row["books_equal_results"] and row["book_records"] == 4
    # Inserted 5 rows; a background merge may already have collapsed the copy.
    assert row["book_rows_before_dedupe"] in (4, 5)

    unbilled = _send(load, "t", 0)
    _answer(load, unbilled)
    billed_twice = _send(load, "t", 1)
    answer = _answer(load, billed_twice)
    _book(store, billed_twice, answer, policies)
    _book(store, billed_twice, answer, policies, attempt=1)
    billed_otherwise = _send(load, "t", 2)
    answer = _answer(load, billed_otherwise)
    _book(store, billed_otherwise, answer.model_copy(update={"tokens_out": 50}), policies)
    row = checks.books(store, load, ["t"], policies)["t"]
    assert (row["unbilled"], row["double_billed"], row["billed_unlike_answer"]) == (1, 2, 1)
    assert not row["books_equal_results"]


def _row(**changes) -> dict:
    row = {"scenario": "worker-kill", "sent": 10, "lost": 0, "conflicting_replies": 0, "double_billed": 0,
           "unbilled": 0, "billed_unlike_answer": 0, "books_equal_results": True, "books_nano_usd": 1,
           "results_nano_usd": 1, "recovery_s": 3.0, "restarts": {"worker.small": 1}, "seen": {}}
    return {**row, **changes}


def test_problems_name_each_broken_promise():
    assert checks.problems(_row()) == []
    assert checks.problems(_row(lost=2)) == ["lost: 2"]
    assert checks.problems(_row(recovery_s=None)) == ["did not recover within the timeout"]
    assert checks.problems(_row(sent=0)) == ["no request was sent"]
    assert checks.problems(_row(books_equal_results=False, results_nano_usd=2)) == ["books 1 nano-USD != results 2"]
    # A fault outside the services must not need a service restarted.
    assert checks.problems(_row(scenario="redis-stop", seen={"degraded_parts_seen": ["router/memory"]},
                                restarts={"router": 1})) == ["services restarted: {'router': 1}"]
    assert checks.problems(_row(scenario="redis-stop", restarts={})) == [
        "no metric said Redis was away (switchyard_redis_degraded stayed 0)"]
    assert checks.problems(_row(scenario="poison-burst", restarts={}, seen={
        "poison_sent": 3, "dead_letters": 2, "addressed": ["x"], "error_replies": 1})) == [
        "3 poison messages, 2 dead letters"]
