"""The live policy: published to a compacted topic, read by every router within a second or two.

`switchyard policy apply FILE` validates a file whole and publishes it; each router reads the
topic from the beginning at start (the last record is what is in force) and then follows it,
swapping its policy between batches. A record that is not a valid policy is logged and
ignored: the policy in force stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka.structs import TopicPartition

from schemas import PolicySet
from shared import kafka
from shared.codec import decode, encode
from shared.errors import UndecodableMessage
from shared.topics import POLICY_KEY, Topics

log = logging.getLogger(__name__)


async def publish(bootstrap: str, topics: Topics, policies: PolicySet) -> None:
    producer = kafka.producer(bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topics.policies, encode(policies), key=POLICY_KEY, partition=0)
    finally:
        await producer.stop()


class PolicyFeed:
    """Follows the policies topic; `latest` is the newest valid policy read, or None."""

    def __init__(self, bootstrap: str, topics: Topics):
        self._bootstrap = bootstrap
        self._tp = TopicPartition(topics.policies, 0)
        self._consumer = None
        self.latest: PolicySet | None = None

    async def start(self) -> PolicySet | None:
        """Read the topic up to its end and return the policy in force, or None if none was applied."""
        self._consumer = kafka.consumer(self._bootstrap, group_id=None)
        await self._consumer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        end = (await self._consumer.end_offsets([self._tp]))[self._tp]
        while await self._consumer.position(self._tp) < end:
            self._take(await self._consumer.getmany(self._tp, timeout_ms=500))
        return self.latest

    async def follow(self, on_change: Callable[[PolicySet], None], stop: asyncio.Event) -> None:
        while not stop.is_set():
            before = self.latest
            self._take(await self._consumer.getmany(self._tp, timeout_ms=200))
            if self.latest is not before and self.latest is not None:
                on_change(self.latest)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    def _take(self, batch) -> None:
        for records in batch.values():
            for record in records:
                try:
                    self.latest = decode(PolicySet, record.value)
                except UndecodableMessage as exc:
                    log.error("ignoring an invalid policy at %s@%d: %s", record.topic, record.offset, exc)


async def in_force(bootstrap: str, topics: Topics) -> PolicySet | None:
    """The policy routers are using now, read from the topic."""
    feed = PolicyFeed(bootstrap, topics)
    try:
        return await feed.start()
    finally:
        await feed.stop()
