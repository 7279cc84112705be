"""The classifier's fast rules, its training (threshold for a target recall) and its file format."""

import json
import time

import numpy as np
import pytest

from schemas import InferenceRequest
from services.router import classify
from services.router.classify import HARD, SIMPLE, Classifier, Model, pick_threshold, read_labeled, rules, train
from services.router.decide import estimate_tokens
from services.router.embed import conversation_text


def verdict(prompt=None, **fields):
    body = {"prompt": prompt} if prompt is not None else {}
    request = InferenceRequest(tenant="t", route="r", reply_to="svc", **body, **fields)
    return rules(request, conversation_text(request), estimate_tokens(request))


@pytest.mark.parametrize("prompt, reason", [
    ("Why does this fail?\n```python\nprint(x[3])\n```", "rule: code"),
    ("Traceback (most recent call last):\n  File \"a.py\", line 3\nKeyError: 'x'", "rule: code"),
    ("def add(a, b):\n    return a - b\nwhat is wrong here", "rule: code"),
    ("Prove that the square root of 2 is irrational.", "rule: mathematics"),
    ("Solve for x: 3x + 5 = 20", "rule: mathematics"),
    ("What is the integral of x^2 from 0 to 3?", "rule: mathematics"),
    ("Walk me through it step by step: should we lease or buy the van?", "rule: multi-step reasoning cue"),
    ("What are the trade-offs between Kafka and RabbitMQ for our order events?", "rule: multi-step reasoning cue"),
])
def test_obvious_hard_requests_are_caught_by_rules(prompt, reason):
    v = verdict(prompt)
    assert (v.label, v.reason) == (HARD, reason)


def test_tools_long_inputs_and_large_schemas_are_hard_small_schemas_are_not():
    assert verdict("weather?", tools=[{"type": "function", "function": {"name": "w"}}]).label == HARD
    assert verdict("summarise this: " + "lorem ipsum dolor " * 400).reason.startswith("rule: long input")
    big = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(20)}}
    assert verdict("fill it", response_schema=big).reason.startswith("rule: response schema")
    small = {"type": "object", "properties": {"city": {"type": "string"}}}
    assert verdict("fill it", response_schema=small).label is None


def test_greetings_are_simple_and_plain_questions_are_left_to_the_model():
    assert verdict("Hi there!").label == SIMPLE
    assert verdict("thanks, that helped").label == SIMPLE
    assert verdict("What is the capital of Peru?").label is None
    # A word that looks like code in prose is not code.
    assert verdict("Import duties on bicycles from Vietnam: roughly how much?").label is None


def test_only_the_last_turn_triggers_the_rules():
    v = verdict(messages=[{"role": "user", "content": "```js\nfoo()\n```"},
                          {"role": "assistant", "content": "Fixed."},
                          {"role": "user", "content": "thanks!"}])
    assert v.label == SIMPLE


def test_threshold_keeps_the_target_recall_of_hard_examples():
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95])
    hard = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 1])
    t = pick_threshold(scores, hard, target_recall=1.0)
    assert t <= 0.35 and (scores[hard == 1] >= t).all()
    t80 = pick_threshold(scores, hard, target_recall=0.8)
    assert 0.35 < t80 <= 0.6  # one of six hard ones may be missed, not two


def test_training_separates_learnable_data_and_reports_cross_validated_recall(tmp_path):
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    x = rng.normal(size=(400, 16))
    hard = (x @ direction > 0.3).astype(np.int64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    model = train(x.astype(np.float32), hard, target_recall=0.95)
    assert model.meta["cross_validated"]["hard_recall"] >= 0.95
    assert model.meta["cross_validated"]["simple_kept_small"] > 0.6
    predicted = model.p_hard(x.astype(np.float32)) >= model.threshold
    assert (predicted[hard == 1]).mean() >= 0.95
    model.save(tmp_path / "c.json")
    again = Model.load(tmp_path / "c.json")
    assert again.threshold == model.threshold
    np.testing.assert_allclose(again.p_hard(x[:5].astype(np.float32)), model.p_hard(x[:5].astype(np.float32)), atol=1e-5)


def test_a_learned_model_decides_what_the_rules_leave_and_says_so():
    class Fixed:
        def embed(self, texts):
            return np.array([[1.0, 0.0] if "hard" in t else [0.0, 1.0] for t in texts], dtype=np.float32)

    model = Model(np.array([4.0, -4.0, 0.0], dtype=np.float32), 0.0, 0.5, {})
    clf = Classifier(model, Fixed())
    items = [(InferenceRequest(tenant="t", route="r", reply_to="svc", prompt=p), p, 5) for p in ("a hard one", "an easy one", "hello")]
    labels = [(v.label, v.reason.split(":")[0]) for v in clf.classify(items)]
    assert labels == [(HARD, "classifier"), (SIMPLE, "classifier"), (SIMPLE, "rule")]
    assert Classifier(None).classify(items[:1])[0].label == SIMPLE


def test_labeled_files_are_read_with_line_numbers_in_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "hi", "label": "simple"}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "x"}], "label": "large"}) + "\n")
    assert [label for _, label in read_labeled(good)] == [SIMPLE, HARD]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "label": "simple"}) + "\n" + json.dumps({"prompt": "x", "label": "meh"}))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: label 'meh'"):
        read_labeled(bad)


# Texts that drove the earlier patterns into quadratic (or worse) backtracking: 24,000 newlines took
# 7.6 s in _CODE, a megabyte far longer than any test would wait.
ADVERSARIAL = {
    "newlines": "\n" * 10**6,
    "indents": " \t\n" * 333_333 + "x",
    "one word": "a" * 10**6,
    "digits": "1" * 10**6 + " ",
    "open call": "a(" + "b" * 10**6,
    "calls": "a(" * 500_000,
    "call then spaces": "f(x)" + " " * 10**6,
    "semicolons": "; " * 500_000 + "x",
    "stack frame": "at " + "x(" * 500_000,
    "from": "from " + "x" * 10**6,
    "select": "SELECT " + "x " * 500_000,
    "dollar and marks": "$" + "=" * 10**6,
    "dollars": "$=a" * 333_333,
    "power": "a " + " " * 10**6 + "x",
    "equation": "1 a + " * 166_666,
    "design": "design a " + "x" * 10**6,
    "greeting": "hi " + "a" * 10**6,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_each_rule_pattern_reads_a_megabyte_of_adversarial_text_in_well_under_a_second(name):
    text = ADVERSARIAL[name]
    for pattern in (classify._CODE, classify._MATH, classify._REASONING):
        started = time.perf_counter()
        pattern.search(text)
        assert time.perf_counter() - started < 1.0, pattern.pattern[:40]
    started = time.perf_counter()
    classify._GREETING.match(text)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_the_rules_decide_on_the_longest_text_they_read_in_milliseconds(name):
    # Longer inputs are decided by their length before any pattern reads them.
    longest = (classify.LONG_INPUT_TOKENS - 1) * 4
    request = InferenceRequest(tenant="t", route="r", reply_to="svc", prompt=ADVERSARIAL[name][:longest])
    assert estimate_tokens(request) <= classify.LONG_INPUT_TOKENS
    took_s = []
    for _ in range(3):  # the best of three: a busy machine's pause is not the pattern's cost
        started = time.perf_counter()
        rules(request, request.prompt, estimate_tokens(request))
        took_s.append(time.perf_counter() - started)
    assert min(took_s) < 0.005


def test_the_linear_patterns_still_find_what_they_are_for():
    for text in ("x = 1;\n", "  \n\n   import os", "foo(a, b) {", "at com.acme.Foo.bar(Foo.java:42)",
                 "SELECT id FROM t", "(a, b) => a + b"):
        assert classify._CODE.search(text), text
    for text in ("What is $x^2 + 1$?", "solve 3x + 5 = 20", "a ^ 2", r"\frac{1}{2}"):
        assert classify._MATH.search(text), text
    for text in ("$5 and $6", "pay at noon (Foo.py:3)", "foo(a) bar {"):
        assert not (classify._CODE.search(text) or classify._MATH.search(text)), text
