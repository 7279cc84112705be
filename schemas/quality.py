"""Eval suites and what sampling them produces: a Sample (an output to score, on a short-lived
topic) and a ScoreRecord (the scores, no text, for the books)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from schemas._base import NAME_PATTERN, Message, WireModel

ANY_TENANT = "*"
MAX_REGEX_CHARS = 10_000  # a regex check refuses a longer output: it runs in at most quadratic time
MAX_UNBOUNDED_REPEATS = 2  # with none nested, fullmatch is at most O(n^2) on an output of n characters
MAX_BOUNDED_REPEAT = 100

try:  # the parser behind re.compile; Python 3.11 names it re._parser
    from re import _parser as _sre_parse
    from re import _constants as _sre
except ImportError:  # pragma: no cover - before 3.11
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]


_REPEATS = tuple(op for op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)) if op)


def _walk(items, inside_repeat: bool, found: list[str]) -> int:
    """Unbounded repeats in a parsed pattern; notes in `found` every shape that could backtrack
    for longer than quadratic time (where a repeated part could match the same text in two ways)."""
    unbounded = 0
    for op, arg in items:
        if op in _REPEATS:
            low, high, body = arg
            if inside_repeat and low != high:
                found.append("a repeat of varying length inside a repeat")
            if high == _sre.MAXREPEAT:
                unbounded += 1
            elif high > MAX_BOUNDED_REPEAT:
                found.append(f"a bounded repeat over {MAX_BOUNDED_REPEAT}")
            unbounded += _walk(body, inside_repeat or high > 1, found)
        elif op == _sre.BRANCH:
            if inside_repeat:
                found.append("alternatives inside a repeat")
            for branch in arg[1]:
                unbounded += _walk(branch, inside_repeat, found)
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            found.append("a backreference")
        elif op == _sre.SUBPATTERN:
            unbounded += _walk(arg[-1], inside_repeat, found)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            unbounded += _walk(arg[1], inside_repeat, found)
        elif op == getattr(_sre, "ATOMIC_GROUP", None):
            unbounded += _walk(arg, inside_repeat, found)
    return unbounded


def safe_pattern(pattern: str) -> str:
    """`pattern`, if Python's backtracking engine matches it in at most quadratic time: no backreferences,
    no repeat of varying length and no alternatives inside a repeat, at most two unbounded repeats
    (*, +, {m,}) in all, bounded ones of at most 100. Else ValueError naming what to change."""
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    found: list[str] = []
    unbounded = _walk(list(parsed), False, found)
    if unbounded > MAX_UNBOUNDED_REPEATS:
        found.append(f"{unbounded} unbounded repeats (at most {MAX_UNBOUNDED_REPEATS})")
    if found:
        raise ValueError("could backtrack for a long time on a crafted output: " + "; ".join(dict.fromkeys(found))
                         + " (use character classes, bounded repeats {m,n}, or fewer .* )")
    return pattern


class _Check(WireModel):
    name: str = Field(pattern=NAME_PATTERN, description="Unique in its suite; names the check's score column.")
    weight: float = Field(default=1.0, gt=0, le=100, description="Its share of the suite's score.")
    when_input_contains: str | None = Field(default=None, min_length=1, max_length=256, description=(
        "Only for requests whose asked text contains this (case-insensitive); the input then travels with the sample."))


class ExactCheck(_Check):
    kind: Literal["exact"]
    expected: str = Field(max_length=100_000)
    ignore_case: bool = False


class RegexCheck(_Check):
    """The whole output (stripped) must match: use `.*` at either end for "contains"."""

    kind: Literal["regex"]
    pattern: Annotated[str, Field(min_length=1, max_length=512), AfterValidator(safe_pattern)]
    ignore_case: bool = False


class JsonSchemaCheck(_Check):
    kind: Literal["json_schema"]
    json_schema: dict[str, Any] | None = Field(default=None, description=(
        "The schema the output's JSON must satisfy (the subset shared.guardrails.check_json knows); none: any JSON."))


class LengthCheck(_Check):
    kind: Literal["length"]
    min_chars: int = Field(default=0, ge=0)
    max_chars: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)


class SimilarityCheck(_Check):
    """Cosine similarity of the output's and the reference's all-MiniLM-L6-v2 embeddings."""

    kind: Literal["similarity"]
    reference: str = Field(min_length=1, max_length=20_000)
    floor: float = Field(ge=-1.0, le=1.0, description="Passes at this similarity or above.")


class JudgeCheck(_Check):
    """A model called through the platform at batch priority scores the answer from 0 to 10."""

    kind: Literal["judge"]
    route: str = Field(pattern=NAME_PATTERN, description="The route the judge's requests go to (no suite of its own).")
    instructions: str = Field(min_length=1, max_length=4_000, description="What a good answer is.")
    floor: float = Field(default=0.5, ge=0.0, le=1.0, description="Passes at this score (0-1) or above.")
    max_tokens: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=120.0, gt=0, le=3600)


Check = Annotated[ExactCheck | RegexCheck | JsonSchemaCheck | LengthCheck | SimilarityCheck | JudgeCheck,
                  Field(discriminator="kind")]


class EvalSuite(Message):
    """A tenant's checks on a route's outputs, and the share of its live traffic to score."""

    tenant: str = Field(pattern=rf"{NAME_PATTERN}|^\*$", description="'*' for every tenant without a suite of its own.")
    route: str = Field(pattern=NAME_PATTERN)
    version: str = Field(min_length=1, max_length=64)
    sample_rate: float = Field(ge=0.0, le=1.0, description="Share of the route's answers scored; 0 turns the suite off.")
    checks: list[Check] = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _distinct(self) -> EvalSuite:
        names = [c.name for c in self.checks]
        if len(set(names)) != len(names):
            raise ValueError(f"check names must be distinct, got {names}")
        return self

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.route}"

    @property
    def needs_input(self) -> bool:
        """Whether scoring reads the request's text: only then does it travel with the sample."""
        return any(c.kind == "judge" or c.when_input_contains for c in self.checks)


class SuiteFile(WireModel):
    """What `switchyard quality apply FILE` reads: suites, each published under its tenant and route."""

    suites: list[EvalSuite] = Field(min_length=1)

    @model_validator(mode="after")
    def _sound(self) -> SuiteFile:
        keys = [s.key for s in self.suites]
        if len(set(keys)) != len(keys):
            raise ValueError(f"one suite per tenant and route, got {keys}")
        judged = {c.route for s in self.suites for c in s.checks if c.kind == "judge"}
        if overlap := judged & {s.route for s in self.suites}:
            raise ValueError(f"a judge's route may not have a suite of its own (it would judge the judge): {sorted(overlap)}")
        return self


class Sample(Message):
    """One answer picked for scoring, on the short-retention samples topic: the output, and the
    asked text only when the suite reads it."""

    request_id: str = Field(min_length=1, max_length=128)
    tenant: str = Field(pattern=NAME_PATTERN)
    route: str = Field(pattern=NAME_PATTERN)
    model: str = Field(pattern=NAME_PATTERN)
    suite_version: str = Field(min_length=1, max_length=64)
    created_at_ms: int = Field(ge=0, description="The request's creation: the hour its score is booked in.")
    ts_ms: int = Field(ge=0, description="When the answer was made.")
    output: str
    asked: str | None = None
    tokens_out: int = Field(default=0, ge=0)
    latency_ms: int = Field(default=0, ge=0)
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    escalated: bool = Field(default=False, description="Answered by a later model of the chain than the first.")


class ScoreRecord(Message):
    """How one sampled answer scored: numbers only, never text."""

    request_id: str = Field(min_length=1, max_length=128)
    created_at_ms: int = Field(ge=0)
    ts_ms: int = Field(ge=0, description="When it was scored.")
    tenant: str = Field(pattern=NAME_PATTERN)
    route: str = Field(pattern=NAME_PATTERN)
    model: str = Field(pattern=NAME_PATTERN)
    suite_version: str = Field(min_length=1, max_length=64)
    score: float = Field(ge=0.0, le=1.0, description="Weighted mean of the checks that ran.")
    passed: bool = Field(description="Every check that ran passed.")
    checks: dict[str, float] = Field(default_factory=dict, description="Score of each check that ran, 0-1.")
    failed: list[str] = Field(default_factory=list, description="Checks that ran and failed.")
    errors: list[str] = Field(default_factory=list, description="Checks that could not run (judge timed out, ...).")
    latency_ms: int = Field(default=0, ge=0)
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    escalated: bool = False
