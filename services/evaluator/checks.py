"""The checks of an eval suite, each scoring one sampled answer from 0 to 1, and how a suite's
checks make its score. Pure functions but for the embedding model (similarity) and the judge
(services/evaluator/judge.py), which are passed in."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from schemas import now_ms
from schemas.quality import (MAX_REGEX_CHARS, Check, EvalSuite, ExactCheck, JsonSchemaCheck, LengthCheck, RegexCheck,
                             Sample, ScoreRecord, SimilarityCheck)
from shared.guardrails import check_json

Embed = Callable[[list[str]], np.ndarray]  # unit-length rows, as services.router.embed.Embedder.embed


@dataclass(frozen=True)
class Verdict:
    """One check on one answer: its score (None when it could not run) and whether it passed."""

    name: str
    score: float | None
    passed: bool
    error: str | None = None


def applies(check: Check, sample: Sample) -> bool:
    """A check with `when_input_contains` scores only answers to requests that contain it."""
    if check.when_input_contains is None:
        return True
    return sample.asked is not None and check.when_input_contains.casefold() in sample.asked.casefold()


def _binary(check: Check, ok: bool) -> Verdict:
    return Verdict(check.name, 1.0 if ok else 0.0, ok)


def exact(check: ExactCheck, output: str) -> Verdict:
    got, want = output.strip(), check.expected.strip()
    if check.ignore_case:
        got, want = got.casefold(), want.casefold()
    return _binary(check, got == want)


_compiled: dict[tuple[str, bool], re.Pattern] = {}


def regex(check: RegexCheck, output: str) -> Verdict:
    """The whole stripped output must match. The pattern's shape was checked when the suite was read
    (schemas.quality.safe_pattern: at most quadratic), and an output over MAX_REGEX_CHARS is not run."""
    text = output.strip()
    if len(text) > MAX_REGEX_CHARS:
        return Verdict(check.name, 0.0, False)
    key = (check.pattern, check.ignore_case)
    if key not in _compiled:
        _compiled[key] = re.compile(check.pattern, re.IGNORECASE | re.DOTALL if check.ignore_case else re.DOTALL)
    return _binary(check, _compiled[key].fullmatch(text) is not None)


def json_schema(check: JsonSchemaCheck, output: str) -> Verdict:
    return _binary(check, check_json(output, check.json_schema) is None)


def length(check: LengthCheck, output: str, tokens_out: int) -> Verdict:
    chars = len(output)
    ok = (chars >= check.min_chars and (check.max_chars is None or chars <= check.max_chars)
          and tokens_out >= check.min_tokens and (check.max_tokens is None or tokens_out <= check.max_tokens))
    return _binary(check, ok)


MAX_CACHED_REFERENCES = 1024
_references: dict[tuple[Embed, str], np.ndarray] = {}  # (the embed function, reference) -> its embedding


def similarity(check: SimilarityCheck, output: str, embed: Embed | None) -> Verdict:
    if embed is None:
        return Verdict(check.name, None, False, "no embedding model")
    if not output.strip():
        return Verdict(check.name, 0.0, False)
    # A suite's references are few and fixed: each is embedded once, not with every answer.
    key = (embed, check.reference)
    if key not in _references:
        if len(_references) >= MAX_CACHED_REFERENCES:
            _references.pop(next(iter(_references)))
        _references[key] = embed([check.reference])[0]
    cosine = float(np.dot(embed([output])[0], _references[key]))
    # The score is the similarity itself, clipped to 0-1; passing is the floor's call.
    return Verdict(check.name, min(1.0, max(0.0, cosine)), cosine >= check.floor)


def run(check: Check, sample: Sample, embed: Embed | None) -> Verdict:
    """A check that needs no model call (everything but the judge)."""
    if isinstance(check, ExactCheck):
        return exact(check, sample.output)
    if isinstance(check, RegexCheck):
        return regex(check, sample.output)
    if isinstance(check, JsonSchemaCheck):
        return json_schema(check, sample.output)
    if isinstance(check, LengthCheck):
        return length(check, sample.output, sample.tokens_out)
    if isinstance(check, SimilarityCheck):
        return similarity(check, sample.output, embed)
    raise TypeError(f"{check.kind} checks are run by the judge")


def combine(suite: EvalSuite, sample: Sample, verdicts: list[Verdict]) -> ScoreRecord | None:
    """The score record of one answer: the weighted mean of the checks that ran. None when none ran
    (every check was for other inputs): such an answer says nothing about the suite."""
    weights = {c.name: c.weight for c in suite.checks}
    ran = [v for v in verdicts if v.score is not None]
    errors = [v.name for v in verdicts if v.score is None]
    if not ran:
        return None
    total = sum(weights[v.name] for v in ran)
    score = sum(weights[v.name] * v.score for v in ran) / total
    return ScoreRecord(
        request_id=sample.request_id, created_at_ms=sample.created_at_ms, ts_ms=now_ms(), tenant=sample.tenant,
        route=sample.route, model=sample.model, suite_version=suite.version, score=min(1.0, max(0.0, score)),
        passed=all(v.passed for v in ran), checks={v.name: v.score for v in ran},
        failed=[v.name for v in ran if not v.passed], errors=errors, latency_ms=sample.latency_ms,
        confidence=sample.confidence, escalated=sample.escalated,
    )
