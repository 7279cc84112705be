"""Following a compacted topic: the newest valid record of each key, read from the beginning at
start and followed after. The live policy and the eval suites both travel this way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from aiokafka.structs import TopicPartition
from pydantic import BaseModel

from shared import kafka
from shared.codec import decode, encode
from shared.errors import UndecodableMessage

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


async def publish(bootstrap: str, topic: str, records: Iterable[tuple[bytes, BaseModel]]) -> None:
    """Publish each (key, message) to partition 0 of a one-partition compacted topic, in order."""
    producer = kafka.producer(bootstrap)
    await producer.start()
    try:
        for key, message in records:
            await producer.send_and_wait(topic, encode(message), key=key, partition=0)
    finally:
        await producer.stop()


class CompactedFeed(Generic[M]):
    """`values` holds the newest valid record of each key read so far. A record that is not a valid
    `kind` is logged and ignored: the value in force for its key stays."""

    def __init__(self, bootstrap: str, topic: str, kind: type[M]):
        self._bootstrap = bootstrap
        self._tp = TopicPartition(topic, 0)
        self._kind = kind
        self._consumer = None
        self.values: dict[bytes, M] = {}

    async def start(self) -> dict[bytes, M]:
        """Read the topic up to its end; the values in force."""
        self._consumer = kafka.consumer(self._bootstrap, group_id=None, off_path=True)
        await self._consumer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        end = (await self._consumer.end_offsets([self._tp]))[self._tp]
        while await self._consumer.position(self._tp) < end:
            self._take(await self._consumer.getmany(self._tp, timeout_ms=500))
        return self.values

    async def follow(self, on_change: Callable[[dict[bytes, M]], None] | None, stop: asyncio.Event) -> None:
        """Take new records until `stop` is set, calling `on_change` after each batch that changed a value."""
        while not stop.is_set():
            if self._take(await self._consumer.getmany(self._tp, timeout_ms=200)) and on_change is not None:
                on_change(self.values)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    def _take(self, batch) -> bool:
        changed = False
        for records in batch.values():
            for record in records:
                try:
                    self.values[record.key] = decode(self._kind, record.value)
                    changed = True
                except UndecodableMessage as exc:
                    log.error("ignoring an invalid %s at %s@%d: %s", self._kind.__name__, record.topic,
                              record.offset, exc)
        return changed
