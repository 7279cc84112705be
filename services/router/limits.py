"""Per-tenant request and token limits per minute, held in Redis so every router shares them.

Fixed one-minute windows; a request is admitted only if both its count and its tokens (the
estimated input plus the capped max_tokens, reserved up front) fit, and only an admitted
request is counted, atomically, in one Lua call per batch. Without Redis the router admits everything
and says so in its log: limits are a guard, not a reason to stop serving.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import TenantLimits
from shared.metrics import RedisDegraded

log = logging.getLogger(__name__)

KEY_PREFIX = "switchyard:limit:"
WINDOW_S = 60

# One ask, as a Lua function the router's gate script shares (services/router/gate.py): `ask` is
# [its requests counter key, its tokens counter key, max requests, max tokens (-1: no limit), its
# tokens (a string: INCRBY takes it as written)]. Returns 0 and counts it if it fits, else 1 when over
# the request limit, 2 when over the token limit.
ADMIT_LUA = """
local function admit(ttl, ask)
  local requests_key, tokens_key = ask[1], ask[2]
  local max_requests, max_tokens, n = ask[3], ask[4], tonumber(ask[5])
  local requests = tonumber(redis.call('GET', requests_key) or '0')
  local tokens = tonumber(redis.call('GET', tokens_key) or '0')
  if max_requests >= 0 and requests + 1 > max_requests then
    return 1
  elseif max_tokens >= 0 and tokens + n > max_tokens then
    return 2
  end
  redis.call('INCR', requests_key)
  redis.call('EXPIRE', requests_key, ttl)
  redis.call('INCRBY', tokens_key, ask[5])
  redis.call('EXPIRE', tokens_key, ttl)
  return 0
end
"""

# Admits a batch in one call, in order, each ask seeing the counts of those before it. ARGV[1] is
# the counters' TTL, ARGV[2] a JSON array of asks. (Packed, as in shared.memory: one Redis.) Returns,
# flat, (i, why) for each ask refused.
_ADMIT = ADMIT_LUA + """
local ttl = ARGV[1]
local asks = cjson.decode(ARGV[2])
local out = {}
for i = 1, #asks do
  local why = admit(ttl, asks[i])
  if why > 0 then
    out[#out + 1] = i
    out[#out + 1] = why
  end
end
return out
"""


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after_ms: int
    retriable: bool = True


class TenantLimiter:
    degraded = RedisDegraded("tenant_limits")

    def __init__(self, redis: Redis):
        self.redis = redis
        self._admit = redis.register_script(_ADMIT)
        self.degraded = False

    async def check(self, asks: list[tuple[str, int, TenantLimits]]) -> list[Refusal | None]:
        """For each (tenant, tokens, limits): None if admitted (and counted), else why not."""
        window = Window.now()
        verdicts: list[Refusal | None] = [None] * len(asks)
        limited = [(i, packed) for i, ask in enumerate(asks) if (packed := window.ask(*ask)) is not None]
        if not limited:
            return verdicts
        try:
            answers = await self._admit(args=[TTL_S, orjson.dumps([packed for _, packed in limited])])
        except RedisError as exc:
            self.unavailable(exc)
            return verdicts
        self.degraded = False
        for k in range(0, len(answers), 2):
            i = limited[int(answers[k]) - 1][0]
            verdicts[i] = window.refusal(int(answers[k + 1]), *asks[i])
        return verdicts

    def unavailable(self, exc: Exception) -> None:
        if not self.degraded:
            log.warning("Redis unavailable, admitting every request without tenant limits: %s", exc)
        self.degraded = True


TTL_S = WINDOW_S * 2  # the counters outlive their window by one more


@dataclass(frozen=True)
class Window:
    """The current one-minute window: the keys of its counters and how long until the next."""

    index: int
    retry_after_ms: int

    @classmethod
    def now(cls) -> Window:
        now = time.time()
        return cls(int(now // WINDOW_S), int((WINDOW_S - now % WINDOW_S) * 1000))

    def ask(self, tenant: str, tokens: int, limits: TenantLimits) -> list | None:
        """The ask ADMIT_LUA takes for this tenant, or None if it has no limits to check."""
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return None
        base = f"{KEY_PREFIX}{tenant}:{self.index}"
        return [f"{base}:requests", f"{base}:tokens", _or_unlimited(limits.requests_per_minute),
                _or_unlimited(limits.tokens_per_minute), str(tokens)]

    def refusal(self, why: int, tenant: str, tokens: int, limits: TenantLimits) -> Refusal | None:
        """What to tell the sender of an ask ADMIT_LUA answered `why`; None if it was admitted."""
        if why == 1:
            return Refusal(f"tenant {tenant!r} is over its {limits.requests_per_minute} requests per minute",
                           self.retry_after_ms)
        if why == 2:
            if tokens > limits.tokens_per_minute:
                return Refusal(f"this request needs about {tokens} tokens; tenant {tenant!r} may use "
                               f"{limits.tokens_per_minute} a minute", 0, retriable=False)
            return Refusal(f"tenant {tenant!r} is over its {limits.tokens_per_minute} tokens per minute",
                           self.retry_after_ms)
        return None


def _or_unlimited(limit: int | None) -> int:
    return -1 if limit is None else limit
