"""Interactive before standard before batch, without starving batch.

After each fetch the gate looks at which priorities have a backlog: records came back for them,
or their high watermark is past what the router has read. While a priority has one, every
lower priority's partitions are paused, so the next fetches bring only the urgent requests.
Every `share_every`-th fetch the paused partitions are resumed for that one fetch: a lower
priority keeps a minimum share of the router's rounds, and batch never starves.
"""

from __future__ import annotations

from aiokafka.structs import TopicPartition

from schemas import Priority
from shared.topics import Topics

LEVELS = list(Priority)  # most urgent first


class PriorityGate:
    def __init__(self, topics: Topics, *, share_every: int = 5):
        if share_every < 2:
            raise ValueError("share_every must be at least 2 (1 would mean no priority at all)")
        self._level = {topics.requests(p): i for i, p in enumerate(LEVELS)}
        self._share_every = share_every
        self._next: dict[TopicPartition, int] = {}
        self._rounds = 0
        self.paused_rounds = 0
        self.share_rounds = 0

    def busiest_level(self, consumer, batch: dict) -> int | None:
        """The most urgent priority level with a backlog after this fetch, or None."""
        busy = None
        for tp, records in batch.items():
            if records:
                self._next[tp] = records[-1].offset + 1
                level = self._level.get(tp.topic)
                if level is not None and (busy is None or level < busy):
                    busy = level
        for tp in consumer.assignment():
            level = self._level.get(tp.topic)
            if level is None or (busy is not None and level >= busy) or tp in consumer.paused():
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None and tp in self._next and highwater > self._next[tp]:
                busy = level
        return busy

    def after_fetch(self, consumer, batch: dict) -> None:
        """Pause or resume partitions for the next fetch."""
        self._rounds += 1
        busy = self.busiest_level(consumer, batch)
        lower = [tp for tp in consumer.assignment() if busy is not None and self._level.get(tp.topic, -1) > busy]
        if lower and self._rounds % self._share_every != 0:
            consumer.pause(*lower)
            # Anything not lower than the busy level reads on.
            consumer.resume(*[tp for tp in consumer.paused() if tp not in lower])
            self.paused_rounds += 1
        else:
            if lower:
                self.share_rounds += 1
            consumer.resume(*consumer.paused())
