"""What a worker sent for each attempt of a request, kept in Redis so that a redelivered request
is answered from that record instead of being run (and billed) a second time.

Kafka redelivers a request whenever its worker dies or loses its partition before committing
the request's offset, including after the result went out. The worker writes the messages that
end an attempt (the result and cost record, or the hand-off to the next model and this
attempt's cost record) here before it sends them; a worker that takes the same attempt again
finds them and sends exactly those bytes again. The reply and cost topics are keyed by request
id and the books collapse records of the same (request, attempt), so a resend changes nothing.

Once the broker has acknowledged every one of those messages, the worker marks the attempt
delivered; a redelivery of a delivered attempt sends nothing at all: its answer is already on the
reply topic, and a second copy would only reach the sender twice.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import InferenceResult
from shared.metrics import RedisDegraded

log = logging.getLogger(__name__)

PREFIX = "switchyard:outcome:"
DELIVERED_PREFIX = "switchyard:delivered:"
TTL_S = 7 * 86400  # as long as a request may wait in Kafka and still be redelivered


@dataclass(frozen=True)
class Sent:
    topic: str
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: the messages that say so, and whether they end the request."""

    messages: list[Sent]
    final: bool  # False: handed on to another model, which will answer
    # Sent best effort after the messages, not recorded: what the request's answer does not need.
    notes: tuple[Sent, ...] = ()
    # The final result as an object, when this worker made it (not recorded: the reply holds it).
    result: InferenceResult | None = None
    # Read back from the ledger: the broker acknowledged every message of it once already.
    delivered: bool = False


def _key(tenant: str, request_id: str, attempt: int, prefix: str = PREFIX) -> str:
    # Request ids are the producer's: two tenants may pick the same one, and neither may be answered
    # with the other's outcome. (A tenant name holds no ':', so the key is unambiguous.)
    return f"{prefix}{tenant}:{request_id}:{attempt}"


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


class Ledger:
    degraded = RedisDegraded("ledger")

    def __init__(self, redis: Redis, ttl_s: int = TTL_S):
        self._redis = redis
        self._ttl_s = ttl_s
        self.degraded = False

    async def get(self, tenant: str, request_id: str, attempt: int) -> Outcome | None:
        """The outcome recorded for this attempt, or None (never run, or Redis unreachable: run it)."""
        try:
            raw, delivered = await self._redis.mget(_key(tenant, request_id, attempt),
                                                    _key(tenant, request_id, attempt, DELIVERED_PREFIX))
        except RedisError as exc:
            log.warning("could not read the outcome of %s: %s; running it", request_id, exc)
            self.degraded = True
            return None
        self.degraded = False
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Outcome(
            messages=[Sent(m["topic"], None if m["key"] is None else base64.b64decode(m["key"]),
                           base64.b64decode(m["value"])) for m in data["messages"]],
            final=data["final"],
            delivered=delivered is not None,
        )

    async def put(self, tenant: str, request_id: str, attempt: int, outcome: Outcome) -> None:
        """Record the outcome before it is sent; a failure only costs a re-run if it is redelivered."""
        data = orjson.dumps({
            "final": outcome.final,
            "messages": [{"topic": m.topic, "key": _b64(m.key), "value": _b64(m.value)} for m in outcome.messages],
        })
        try:
            await self._redis.set(_key(tenant, request_id, attempt), data, ex=self._ttl_s)
        except RedisError as exc:
            log.warning("could not record the outcome of %s: %s", request_id, exc)
            self.degraded = True

    async def mark_delivered(self, tenant: str, request_id: str, attempt: int) -> None:
        """Note that the broker acknowledged every message of the attempt's outcome; a failure only
        costs a second copy of them if the request is redelivered."""
        try:
            await self._redis.set(_key(tenant, request_id, attempt, DELIVERED_PREFIX), b"1", ex=self._ttl_s)
        except RedisError as exc:
            log.warning("could not mark the outcome of %s delivered: %s", request_id, exc)
            self.degraded = True
