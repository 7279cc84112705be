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

log = logging.getLogger(__name__)

KEY_PREFIX = "switchyard:limit:"
WINDOW_S = 60

# Admits a batch in one call, in order, each ask seeing the counts of those before it. ARGV[1] is
# the counters' TTL, ARGV[2] a JSON array with, for ask i, [its requests counter key, its tokens
# counter key, max requests, max tokens, its tokens (a string: INCRBY takes it as written)].
# (Packed, as in shared.memory: one Redis.) Returns, flat, (i, why) for each ask refused: 1 over the
# request limit, 2 over the token limit.
_ADMIT = """
local ttl = ARGV[1]
local asks = cjson.decode(ARGV[2])
local out = {}
for i = 1, #asks do
  local requests_key, tokens_key = asks[i][1], asks[i][2]
  local max_requests, max_tokens, n = asks[i][3], asks[i][4], tonumber(asks[i][5])
  local requests = tonumber(redis.call('GET', requests_key) or '0')
  local tokens = tonumber(redis.call('GET', tokens_key) or '0')
  if max_requests >= 0 and requests + 1 > max_requests then
    out[#out + 1] = i
    out[#out + 1] = 1
  elseif max_tokens >= 0 and tokens + n > max_tokens then
    out[#out + 1] = i
    out[#out + 1] = 2
  else
    redis.call('INCR', requests_key)
    redis.call('EXPIRE', requests_key, ttl)
    redis.call('INCRBY', tokens_key, asks[i][5])
    redis.call('EXPIRE', tokens_key, ttl)
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
    def __init__(self, redis: Redis):
        self._redis = redis
        self._admit = redis.register_script(_ADMIT)
        self.degraded = False

    async def check(self, asks: list[tuple[str, int, TenantLimits]]) -> list[Refusal | None]:
        """For each (tenant, tokens, limits): None if admitted (and counted), else why not."""
        now = time.time()
        window = int(now // WINDOW_S)
        retry_after_ms = int((WINDOW_S - now % WINDOW_S) * 1000)
        verdicts: list[Refusal | None] = [None] * len(asks)
        limited = [(i, ask) for i, ask in enumerate(asks)
                   if ask[2].requests_per_minute is not None or ask[2].tokens_per_minute is not None]
        if not limited:
            return verdicts
        packed = []
        for _, (tenant, tokens, limits) in limited:
            base = f"{KEY_PREFIX}{tenant}:{window}"
            packed.append((f"{base}:requests", f"{base}:tokens", _or_unlimited(limits.requests_per_minute),
                           _or_unlimited(limits.tokens_per_minute), str(tokens)))
        try:
            answers = await self._admit(args=[WINDOW_S * 2, orjson.dumps(packed)])
        except RedisError as exc:
            if not self.degraded:
                log.warning("Redis unavailable, admitting every request without tenant limits: %s", exc)
            self.degraded = True
            return verdicts
        self.degraded = False
        for k in range(0, len(answers), 2):
            (i, (tenant, tokens, limits)), answer = limited[int(answers[k]) - 1], int(answers[k + 1])
            if answer == 1:
                verdicts[i] = Refusal(f"tenant {tenant!r} is over its {limits.requests_per_minute} requests "
                                      "per minute", retry_after_ms)
            elif answer == 2:
                if tokens > limits.tokens_per_minute:
                    verdicts[i] = Refusal(f"this request needs about {tokens} tokens; tenant {tenant!r} may use "
                                          f"{limits.tokens_per_minute} a minute", 0, retriable=False)
                else:
                    verdicts[i] = Refusal(f"tenant {tenant!r} is over its {limits.tokens_per_minute} tokens per "
                                          "minute", retry_after_ms)
        return verdicts


def _or_unlimited(limit: int | None) -> int:
    return -1 if limit is None else limit
