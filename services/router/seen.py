"""Remembers, in Redis, which requests the router has already forwarded.

The router commits its offsets after forwarding a batch; if it dies in between, the batch is
delivered again. This log lets the router recognise those redeliveries and skip them, so a
worker never runs a request twice because the router restarted. A request id reused for
different content is not a redelivery: it is refused, never silently dropped.
"""

from __future__ import annotations

import hashlib
import logging

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from shared.metrics import RedisDegraded

log = logging.getLogger(__name__)

KEY_PREFIX = "switchyard:routed:"

# Records a batch in one call: ARGV[2] is a JSON array of [key, digest]; each key gets its digest
# unless it has a value; ARGV[1] is the TTL in s. (Packed, as in shared.memory: one Redis.)
_RECORD = """
local entries = cjson.decode(ARGV[2])
for i = 1, #entries do
  redis.call('SET', entries[i][1], entries[i][2], 'EX', ARGV[1], 'NX')
end
return #entries
"""

def content_digest(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=12).hexdigest()


class ForwardedLog:
    degraded = RedisDegraded("forwarded_log")

    def __init__(self, redis: Redis, window_s: int = 24 * 3600):
        self.redis = redis
        self._window_s = window_s
        self._record = redis.register_script(_RECORD)
        self.degraded = False

    @staticmethod
    def key(tenant: str, request_id: str) -> str:
        return f"{KEY_PREFIX}{tenant}:{request_id}"

    async def record(self, entries: list[tuple[str, str, str]]) -> None:
        """Record (tenant, request id, content digest) for requests whose forwarding the broker acknowledged."""
        if not entries:
            return
        try:
            await self._record(args=[self._window_s, orjson.dumps(
                [(self.key(tenant, request_id), digest) for tenant, request_id, digest in entries])])
        except RedisError as exc:
            self.unavailable(exc)

    def unavailable(self, exc: Exception) -> None:
        # Routing goes on without Redis: a redelivery may then run twice, which is better
        # than not answering at all.
        if not self.degraded:
            log.warning("Redis unavailable, forwarding without the redelivery check: %s", exc)
        self.degraded = True
