"""Which offsets a consumer may commit when many records of a partition are in flight at once.

Kafka commits a single position per partition, so a worker that finishes record 7 before
record 5 may commit only up to 5: committing 8 would lose 5 if the worker died. Keeping
many records in flight per partition and committing up to the lowest unfinished one keeps
the engine full without giving up at-least-once delivery.
"""

from __future__ import annotations

from aiokafka.structs import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        self._pending.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        pending = self._pending.get(tp)
        if pending is not None:
            pending.discard(offset)

    def committable(self) -> dict[TopicPartition, int]:
        """Per partition, the offset to commit: the lowest unfinished one, or one past the last taken."""
        return {tp: min(self._pending[tp]) if self._pending.get(tp) else nxt for tp, nxt in self._next.items()}

    def forget(self, partitions) -> None:
        """Drop partitions this consumer no longer owns (after a rebalance)."""
        for tp in partitions:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)
