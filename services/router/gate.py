"""The router's one Redis call per batch: the redelivery check, the tenant limits, the exact cache
and the idempotency claim, request by request, in one Lua script.

Three calls in a row used to cost a batch three round trips; under load each of them waited about a
millisecond for the event loop, most of a request's decision time. The script runs the same steps
as the three modules that own them (services/router/seen.py, services/router/limits.py,
shared/memory.py) and shares their Lua, so each step means what it means on its own:

1. a request already forwarded with the same content is a redelivery (skipped); with other content,
   its id was reused (refused);
2. a request the router answers itself (expired, invalid) goes no further;
3. the tenant's limits admit and count it, or refuse it;
4. the exact cache answers it if its route opts in;
5. otherwise it is claimed, so a repeat waits for it (or it is left open: the router's semantic
   cache, asked before the call, answers it, or its route has no idempotency window).

Like each module alone, it needs one Redis (the keys travel in ARGV) and fails open: without
Redis every request goes on, unchecked, and each module says so once in its log.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from redis.exceptions import RedisError

from schemas import InferenceRequest, InferenceResult, TenantLimits
from services.router.limits import ADMIT_LUA, TTL_S, Refusal, TenantLimiter, Window
from services.router.seen import ForwardedLog
from shared.memory import CLAIM_LUA, Claim, Memory, claim_ask

# ARGV[1]: the limit counters' TTL; ARGV[2]: a JSON array with, per request, [its forwarded-log key,
# its content digest, 1 to go on past the redelivery check or 0, its limit ask or 0, its exact cache
# key or '', its claim ask or 0, the index in ARGV of its claim payload]. Returns, flat, (state,
# value) per request.
_GATE = ADMIT_LUA + CLAIM_LUA + """
local ttl = ARGV[1]
local asks = cjson.decode(ARGV[2])
local out = {}
for i = 1, #asks do
  local a = asks[i]
  local state, value = 'open', ''
  local seen = redis.call('GET', a[1])
  if seen then
    if seen == a[2] then state = 'redelivered' else state = 'conflict' end
  elseif a[3] == 0 then
    state = 'final'
  else
    local why = 0
    if a[4] ~= 0 then why = admit(ttl, a[4]) end
    if why == 1 then
      state = 'over_requests'
    elseif why == 2 then
      state = 'over_tokens'
    else
      if a[5] ~= '' then
        local hit = redis.call('GET', a[5])
        if hit then state, value = 'exact', hit end
      end
      if state == 'open' and a[6] ~= 0 then
        state, value = claim(a[6], ARGV[a[7]])
      end
    end
  end
  out[#out + 1] = state
  out[#out + 1] = value
end
return out
"""


@dataclass(frozen=True)
class Ask:
    """One request at the gate. `go_on` is False for a request the router answers itself once it is
    known not to be a redelivery; `limits` (with `tokens`) for one the limiter must count;
    `exact_key` for a route with an exact cache; `claim_window_s` for one to claim."""

    request: InferenceRequest
    digest: str
    go_on: bool = True
    tokens: int = 0
    limits: TenantLimits | None = None
    exact_key: str | None = None
    claim_window_s: int | None = None
    claim_key: str | None = None  # its idempotency key, where the caller worked it out already


@dataclass(frozen=True)
class Passage:
    """What the gate said of one request. state: redelivered, conflict (its id was used for other
    content), final (answer it as decided), limited (`refusal` says why), exact (`hit`), claimed,
    waiting or done (`claim`), or open (not claimed: go on)."""

    state: str
    refusal: Refusal | None = None
    hit: InferenceResult | None = None
    claim: Claim | None = None


class Gate:
    def __init__(self, forwarded: ForwardedLog, limiter: TenantLimiter, memory: Memory | None):
        self._forwarded, self._limiter, self._memory = forwarded, limiter, memory
        self._script = forwarded.redis.register_script(_GATE)

    async def check(self, asks: list[Ask]) -> list[Passage]:
        if not asks:
            return []
        window = Window.now()
        packed, payloads = [], []
        for ask in asks:
            request = ask.request
            limit = window.ask(request.tenant, ask.tokens, ask.limits) if ask.limits is not None else None
            claim, at = 0, 0
            if ask.claim_window_s is not None and self._memory is not None:
                claim, payload = claim_ask(request, ask.claim_window_s, ask.claim_key)
                payloads.append(payload)
                at = 2 + len(payloads)
            packed.append([self._forwarded.key(request.tenant, request.id), ask.digest, int(ask.go_on),
                           limit or 0, (ask.exact_key or "") if self._memory is not None else "", claim, at])
        try:
            replies = await self._script(args=[TTL_S, orjson.dumps(packed), *payloads])
        except RedisError as exc:
            for part in (self._forwarded, self._limiter, self._memory):
                if part is not None:
                    part.unavailable(exc)
            return [Passage("final") if not a.go_on
                    else Passage("claimed", claim=Claim("claimed")) if a.claim_window_s is not None
                    else Passage("open") for a in asks]
        for part in (self._forwarded, self._limiter, self._memory):
            if part is not None:
                part.degraded = False
        out = []
        for k, ask in enumerate(asks):
            state, value = replies[2 * k].decode(), replies[2 * k + 1]
            if state in ("over_requests", "over_tokens"):
                why = 1 if state == "over_requests" else 2
                out.append(Passage("limited", refusal=window.refusal(why, ask.request.tenant, ask.tokens, ask.limits)))
            elif state == "exact":
                out.append(Passage("exact", hit=InferenceResult.model_validate_json(value)))
            elif state in ("claimed", "waiting", "done"):
                out.append(Passage(state, claim=Claim.parse(state.encode(), value)))
            else:
                out.append(Passage(state))
        return out
