"""The sink: cost records from the costs topic into ClickHouse, in batches.

The order is what makes the books exact: (1) insert the batch, (2) commit its offsets.
If the sink dies after (1) and before (2), the batch is read and inserted again; the table
is a ReplacingMergeTree keyed on (request, attempt), and every read uses FINAL, so the
second copy never counts. Committing before inserting could lose records; never do that.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka.structs import ConsumerRecord

from schemas import CostRecord
from services.sink.store import CostStore
from shared import kafka
from shared.codec import decode
from shared.errors import UndecodableMessage
from shared.outcomes import Outcomes, delivered
from shared.topics import Topics

log = logging.getLogger(__name__)


class Sink:
    def __init__(self, *, bootstrap: str, topics: Topics, store: CostStore, max_batch_rows: int = 10_000,
                 flush_interval_s: float = 1.0, group_id: str = "sink", final_drain_s: float = 10.0):
        self._bootstrap = bootstrap
        self._topics = topics
        self._store = store
        self._max_batch_rows = max_batch_rows
        self._flush_interval_s = flush_interval_s
        self._group_id = group_id
        self._final_drain_s = final_drain_s

    async def run(self, stop: asyncio.Event) -> None:
        async with kafka.consuming(self._bootstrap, [self._topics.costs], group_id=self._group_id) as (
            consumer, producer
        ):
            log.info("sink consuming %s into ClickHouse (batches of up to %d rows or %.1f s)",
                     self._topics.costs, self._max_batch_rows, self._flush_interval_s)
            await self._consume(consumer, Outcomes(producer, self._topics), stop)

    async def _consume(self, consumer, outcomes: Outcomes, stop: asyncio.Event) -> None:
        pending: list[tuple[ConsumerRecord, CostRecord]] = []
        offsets: dict = {}
        first_buffered = None
        drain_until = None
        while True:
            if stop.is_set() and drain_until is None:
                # Stopping: read what is already on the topic first, so the last cost records
                # of a stack that is shutting down are booked, not left behind.
                drain_until = time.monotonic() + self._final_drain_s
            if drain_until is not None and (time.monotonic() > drain_until or await _at_end(consumer)):
                break
            batch = await consumer.getmany(timeout_ms=100, max_records=self._max_batch_rows - len(pending))
            for tp, records in batch.items():
                for record in records:
                    try:
                        pending.append((record, decode(CostRecord, record.value)))
                    except UndecodableMessage as exc:
                        await delivered(outcomes.dead_letter(record, exc.code, str(exc)))
                offsets[tp] = records[-1].offset + 1
            if offsets and first_buffered is None:
                first_buffered = time.monotonic()
            due = first_buffered is not None and time.monotonic() - first_buffered >= self._flush_interval_s
            if len(pending) >= self._max_batch_rows or (offsets and due):
                await self._flush(consumer, pending, offsets, outcomes)
                pending, offsets, first_buffered = [], {}, None
        if offsets:
            await self._flush(consumer, pending, offsets, outcomes)

    async def _flush(self, consumer, pending: list[tuple[ConsumerRecord, CostRecord]], offsets: dict,
                     outcomes: Outcomes) -> None:
        # (1) insert, (2) commit: see the module docstring.
        try:
            await asyncio.to_thread(self._store.insert, [row for _, row in pending])
        except Exception as exc:  # clickhouse-connect raises several types for one bad row
            await self._insert_one_by_one(pending, exc, outcomes)
        await kafka.commit(consumer, offsets)
        log.debug("inserted %d cost records", len(pending))

    async def _insert_one_by_one(self, pending, batch_error: Exception, outcomes: Outcomes) -> None:
        """Find the rows ClickHouse refuses and dead-letter them, so one bad row cannot stop the books.
        If every row fails, ClickHouse itself is the problem: raise, commit nothing, retry on restart."""
        refused = []
        for record, row in pending:
            try:
                await asyncio.to_thread(self._store.insert, [row])
            except Exception as exc:
                refused.append((record, exc))
        if len(refused) == len(pending):
            raise batch_error
        for record, exc in refused:
            await delivered(outcomes.dead_letter(record, "unbookable", f"ClickHouse refused the row: {exc}"))


async def _at_end(consumer) -> bool:
    assigned = consumer.assignment()
    if not assigned:
        return True
    ends = await consumer.end_offsets(list(assigned))
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True
