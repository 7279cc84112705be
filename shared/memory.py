"""What Switchyard remembers of answered requests, in Redis: idempotency and the exact cache.

Idempotency: the router claims a request's idempotency key (the caller's `idempotency_key`,
or the hash of its content) for its tenant before forwarding it. A second request with the
same key then either gets the stored result of the first, or, while the first is still in
flight, joins its waiters; the worker that finishes the first stores its result and answers
every waiter. Claim and completion are Lua scripts, so a waiter is never added after the
worker has looked; the waiters are removed only once their answers are on the broker, so a
worker that dies in between answers them again when its request is redelivered. Only the first request runs and is billed; the others get zero-cost
records marked `idempotent`.

Exact cache: an ok result of a route that opts in is stored under the hash of the request's
content (namespaced by tenant unless the route shares its cache) for the route's TTL.

Both are best effort: without Redis a request is run rather than refused, and a failure to
store is logged, never allowed to hold up the answer itself.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import CacheHit, InferenceRequest, InferenceResult, Latency, RoutedRequest, now_ms
from schemas.policy import RoutePolicy
from shared.metrics import RedisDegraded

log = logging.getLogger(__name__)

PREFIX = "switchyard:"
INFLIGHT = b"inflight:"
# A claim whose worker never completes (its request was lost) stops blocking re-runs after this.
MAX_INFLIGHT_S = 300

# Claims one request, as a Lua function the router's gate script shares (services/router/gate.py):
# `ask` is [its key, its id, the claim's TTL in ms], `payload` its JSON (queued as a waiter if the
# first is in flight). Returns 'claimed' (run it; also for its own claim, on a redelivery), 'waiting'
# with the first one's id, or 'done' with its result.
CLAIM_LUA = """
local function claim(ask, payload)
  local key, id, ttl = ask[1], ask[2], ask[3]
  local v = redis.call('GET', key)
  if not v then
    redis.call('SET', key, 'inflight:' .. id, 'PX', ttl)
  elseif string.sub(v, 1, 9) == 'inflight:' then
    if string.sub(v, 10) ~= id then
      local waiters = key .. ':waiters'
      redis.call('RPUSH', waiters, payload)
      redis.call('PEXPIRE', waiters, ttl)
      return 'waiting', string.sub(v, 10)
    end
  else
    return 'done', v
  end
  return 'claimed', ''
end
"""

# Claims a batch in one call, in order. ARGV[1] is a JSON array of asks; ARGV[i + 1] is request i's
# JSON. One packed argument instead of five per request: redis-py packs each argument in Python,
# which cost the router more than the script. The keys travel in ARGV, so this needs one Redis, not
# a cluster. Returns, flat, (i, state, value) for each request that is not claimed.
_CLAIM = CLAIM_LUA + """
local out = {}
local asks = cjson.decode(ARGV[1])
for i = 1, #asks do
  local state, value = claim(asks[i], ARGV[i + 1])
  if state ~= 'claimed' then
    out[#out + 1] = i
    out[#out + 1] = state
    out[#out + 1] = value
  end
end
return out
"""

_COMPLETE = """
local v = redis.call('GET', KEYS[1])
local waiters = redis.call('LRANGE', KEYS[2], 0, -1)
if (not v) or v == 'inflight:' .. ARGV[1] then
  if ARGV[2] ~= '' then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  else
    redis.call('DEL', KEYS[1])
  end
end
return waiters
"""


def content_hash(request: InferenceRequest) -> str:
    """What makes two requests the same request: route, conversation, sampling, schema and tools."""
    content = {
        "route": request.route,
        "messages": [m.model_dump(mode="json") for m in request.messages] if request.messages is not None else None,
        "prompt": request.prompt,
        "sampling": request.sampling.model_dump(mode="json"),
        "response_schema": request.response_schema,
        "tools": request.tools,
    }
    return hashlib.blake2b(orjson.dumps(content, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


def cache_namespace(request: InferenceRequest, policy: RoutePolicy) -> str:
    """Tenants never see each other's cached answers unless the route says its cache is shared."""
    owner = "*" if policy.cache.shared else request.tenant
    return f"{request.route}:{owner}"


def idempotency_key(request: InferenceRequest, content: str | None = None) -> str:
    """`content`: the request's content_hash, where the caller has it already."""
    if request.idempotency_key is not None:
        return f"{PREFIX}idem:{request.tenant}:k:{request.idempotency_key}"
    return f"{PREFIX}idem:{request.tenant}:c:{content or content_hash(request)}"


def exact_key(namespace: str, digest: str) -> str:
    return f"{PREFIX}exact:{namespace}:{digest}"


def replay(first: InferenceResult, request: InferenceRequest, cache_hit: CacheHit) -> InferenceResult:
    """The first request's result, answered to `request`: its id, its latency, marked as not run again."""
    return first.model_copy(update={
        "request_id": request.id,
        "tenant": request.tenant,
        "route": request.route,
        "cache_hit": cache_hit,
        "replay_of": first.replay_of or first.request_id,
        "latency": Latency(total_ms=max(0, now_ms() - request.created_at_ms)),
    })


@dataclass(frozen=True)
class Claim:
    state: str  # "claimed" (run it), "waiting" (the first is in flight), "done" (the first has a result)
    first: InferenceResult | None = None
    first_id: str | None = None

    @classmethod
    def parse(cls, state: bytes, value: bytes) -> Claim:
        """A claim from what CLAIM_LUA returned."""
        if state == b"done":
            return cls("done", first=InferenceResult.model_validate_json(value))
        if state == b"waiting":
            return cls("waiting", first_id=value.decode())
        return cls("claimed")


def claim_ask(request: InferenceRequest, window_s: int, key: str | None = None) -> tuple[list, str]:
    """CLAIM_LUA's ask for a request (under `key`, its idempotency key if the caller has it), and its payload."""
    return ([key or idempotency_key(request), request.id, str(1000 * min(window_s, MAX_INFLIGHT_S))],
            request.model_dump_json())


class Memory:
    degraded = RedisDegraded("memory")

    def __init__(self, redis: Redis):
        self.redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)
        self.degraded = False

    async def claim(self, requests: list[tuple[InferenceRequest, int]]) -> list[Claim]:
        """Claim (request, window seconds) pairs in one script call, in order. Without Redis, everything
        is claimed."""
        if not requests:
            return []
        asks, payloads = [], []
        for request, window_s in requests:
            ask, payload = claim_ask(request, window_s)
            asks.append(ask)
            payloads.append(payload)
        try:
            replies = await self._claim(args=[orjson.dumps(asks), *payloads])
        except RedisError as exc:
            self.unavailable(exc)
            return [Claim("claimed")] * len(requests)
        self.degraded = False
        claims = [Claim("claimed")] * len(requests)
        for k in range(0, len(replies), 3):
            claims[int(replies[k]) - 1] = Claim.parse(replies[k + 1], replies[k + 2])
        return claims

    async def complete(self, routed: RoutedRequest, result: InferenceResult) -> list[InferenceRequest]:
        """Record the result of a routed request; the requests that waited for it, to be answered
        and then passed to `answered`. Only ok results are kept: after a failure the next identical
        request runs again."""
        memo = routed.memo
        if memo is None:
            return []
        value = orjson.dumps(result.model_dump(mode="json", exclude_none=True)) if result.status == "ok" else b""
        try:
            waiters = []
            if memo.idempotency_key is not None:
                waiters = await self._complete(keys=[memo.idempotency_key, memo.idempotency_key + ":waiters"],
                                               args=[routed.request.id, value, 1000 * memo.window_s])
            if memo.exact_key is not None and value:
                await self.redis.set(memo.exact_key, value, ex=memo.cache_ttl_s)
        except RedisError as exc:
            log.warning("could not record the result of %s in Redis: %s", routed.request.id, exc)
            return []
        return [InferenceRequest.model_validate_json(w) for w in waiters]

    async def answered(self, routed: RoutedRequest, count: int) -> None:
        """The first `count` waiters of the routed request have their answers: forget them."""
        if count and routed.memo is not None and routed.memo.idempotency_key is not None:
            try:
                await self.redis.ltrim(routed.memo.idempotency_key + ":waiters", count, -1)
            except RedisError as exc:
                log.warning("could not clear the answered waiters of %s: %s", routed.request.id, exc)

    def unavailable(self, exc: Exception) -> None:
        if not self.degraded:
            log.warning("Redis unavailable: no idempotency or exact cache until it is back: %s", exc)
        self.degraded = True
