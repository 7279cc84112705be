"""The judge check: a model of the platform, called through it at batch priority like any caller,
scores an answer from 0 to 10."""

from __future__ import annotations

import re

from schemas import Priority, Status
from schemas.quality import JudgeCheck, Sample
from services.evaluator.checks import Verdict
from shared.client import Client
from shared.errors import SwitchyardError

MAX_QUOTED_CHARS = 8_000  # of the question and of the answer, each, quoted to the judge
_NUMBER = re.compile(r"\d{1,3}(?:\.\d{1,3})?")  # bounded: linear on any reply


def prompt(check: JudgeCheck, sample: Sample) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": (
            "You grade answers. " + check.instructions
            + "\nReply with one number from 0 (useless) to 10 (perfect) and nothing else.")},
        {"role": "user", "content": (
            f"Question:\n{(sample.asked or '')[:MAX_QUOTED_CHARS]}\n\nAnswer:\n{sample.output[:MAX_QUOTED_CHARS]}"
            "\n\nScore (0-10):")},
    ]


def parse(reply: str) -> float | None:
    """The first number in the judge's reply, as a 0-1 score; None if it wrote none from 0 to 10."""
    match = _NUMBER.search(reply[:1000])
    if match is None or float(match.group()) > 10:
        return None
    return float(match.group()) / 10


async def judge(client: Client, check: JudgeCheck, sample: Sample) -> Verdict:
    try:
        result = await client.complete(tenant=sample.tenant, route=check.route, messages=prompt(check, sample),
                                       priority=Priority.batch, max_tokens=check.max_tokens, temperature=0.0,
                                       timeout_s=check.timeout_s)
    except SwitchyardError as exc:
        return Verdict(check.name, None, False, f"judge call failed: {exc.code}")
    if result.status != Status.ok:
        return Verdict(check.name, None, False, f"judge answered {result.status.value}")
    score = parse(result.output)
    if score is None:
        return Verdict(check.name, None, False, "judge reply had no score")
    return Verdict(check.name, score, score >= check.floor)
