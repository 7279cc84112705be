"""Interactive before standard before batch, without starving batch.

The router reads each priority's topic with a consumer of its own, so what one priority has
buffered never stands in front of another's records. Each round it takes up to `max_batch`
requests, most urgent first; a less urgent priority with a backlog still gets a guaranteed
share of every round (`min_share` of it), so a flood of interactive requests slows batch
down but never stops it. When every priority is idle it waits for whichever speaks first.
"""

from __future__ import annotations

import asyncio
import math

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, TopicPartition

from schemas import Priority

LEVELS = list(Priority)  # most urgent first
IDLE_WAIT_MS = 100


class Lanes:
    def __init__(self, consumers: dict[Priority, AIOKafkaConsumer], *, max_batch: int = 500, min_share: float = 0.1):
        if not 0 < min_share < 1:
            raise ValueError("min_share must be between 0 and 1")
        self.consumers = consumers
        self._max_batch = max_batch
        self._reserved = max(1, math.floor(max_batch * min_share))
        self.taken: dict[Priority, int] = {p: 0 for p in consumers}

    async def take(self) -> dict[Priority, dict[TopicPartition, list[ConsumerRecord]]]:
        """One round of records by priority; empty if every priority stayed idle for a short wait."""
        got = await self._round()
        if not any(got.values()):
            got = await self._first_to_speak()
        for priority, batch in got.items():
            self.taken[priority] += sum(len(r) for r in batch.values())
        return got

    async def _round(self) -> dict[Priority, dict[TopicPartition, list[ConsumerRecord]]]:
        levels = [p for p in LEVELS if p in self.consumers]
        got: dict[Priority, dict] = {}
        left = self._max_batch
        for i, priority in enumerate(levels):
            # Leave room for each less urgent level: its minimum share of the round.
            room = max(left - self._reserved * (len(levels) - 1 - i), self._reserved)
            batch = await self.consumers[priority].getmany(timeout_ms=0, max_records=room)
            got[priority] = batch
            left -= sum(len(r) for r in batch.values())
        return got

    async def _first_to_speak(self) -> dict[Priority, dict[TopicPartition, list[ConsumerRecord]]]:
        """Wait on every idle priority at once; whatever arrives first (with anything else that has
        arrived by then) is this round. A wait cancelled before it returns takes no records."""
        share = max(self._reserved, self._max_batch // len(self.consumers))
        waits = {asyncio.ensure_future(c.getmany(timeout_ms=IDLE_WAIT_MS, max_records=share)): p
                 for p, c in self.consumers.items()}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return {waits[task]: task.result() for task in done}
