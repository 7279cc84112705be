"""The output check of requests that ask for JSON (a response_schema): an answer that is not JSON
of that schema gets one repair attempt through the same model, then is refused as invalid_output."""

from __future__ import annotations

from dataclasses import dataclass, replace

from schemas import ChatMessage, InferenceRequest
from services.worker.engine import Backend, Completion
from shared.guardrails import check_json, repair_prompt

PASSED, REPAIRED, REFUSED = "passed", "repaired", "refused"


@dataclass(frozen=True)
class Checked:
    completion: Completion  # what to answer with: the first, or the repair with both calls' counts
    outcome: str  # PASSED, REPAIRED or REFUSED
    reason: str | None  # why the first answer failed; for REFUSED, why the repair did too


def repair_request(request: InferenceRequest, output: str, reason: str) -> InferenceRequest:
    """The conversation so far, the refused answer, and the ask to write it again as JSON."""
    asked = request.messages or [ChatMessage(role="user", content=request.prompt or "")]
    return request.model_copy(update={"prompt": None, "stream": False, "messages": [
        *asked, ChatMessage(role="assistant", content=output),
        ChatMessage(role="user", content=repair_prompt(output, reason, request.response_schema))]})


async def check_output(backend: Backend, request: InferenceRequest, first: Completion, *, request_id: str) -> Checked:
    """Check `first` against the request's schema; repair it once if it fails. A repair that the
    deadline cuts short counts as refused: what ran is billed either way."""
    reason = check_json(first.text, request.response_schema)
    if reason is None:
        return Checked(first, PASSED, None)
    again = await backend.run(repair_request(request, first.text, reason), request_id=f"{request_id}:repair",
                              max_tokens=request.sampling.max_tokens, deadline_ms=request.deadline_unix_ms)
    both = replace(again, tokens_in=first.tokens_in + again.tokens_in, tokens_out=first.tokens_out + again.tokens_out,
                   cached_tokens=first.cached_tokens + again.cached_tokens, ttft_ms=first.ttft_ms)
    still = "the deadline passed during the repair" if again.expired else check_json(again.text, request.response_schema)
    return Checked(both, REPAIRED, reason) if still is None else Checked(both, REFUSED, still)
