"""Per-tenant request and token limits per minute, held in Redis so every router shares them.

Fixed one-minute windows; a request is admitted only if both its count and its tokens (the
estimated input plus the capped max_tokens, reserved up front) fit, and only an admitted
request is counted, atomically, in one Lua call. Without Redis the router admits everything
and says so in its log: limits are a guard, not a reason to stop serving.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import TenantLimits

log = logging.getLogger(__name__)

KEY_PREFIX = "switchyard:limit:"
WINDOW_S = 60

_ADMIT = """
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
local max_requests, max_tokens, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if max_requests >= 0 and requests + 1 > max_requests then return 1 end
if max_tokens >= 0 and tokens + n > max_tokens then return 2 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('INCRBY', KEYS[2], n)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 0
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
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for _, (tenant, tokens, limits) in limited:
                    base = f"{KEY_PREFIX}{tenant}:{window}"
                    await self._admit(keys=[f"{base}:requests", f"{base}:tokens"],
                                      args=[_or_unlimited(limits.requests_per_minute),
                                            _or_unlimited(limits.tokens_per_minute), tokens, WINDOW_S * 2],
                                      client=pipe)
                answers = await pipe.execute()
        except RedisError as exc:
            if not self.degraded:
                log.warning("Redis unavailable, admitting every request without tenant limits: %s", exc)
            self.degraded = True
            return verdicts
        self.degraded = False
        for (i, (tenant, tokens, limits)), answer in zip(limited, answers):
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
