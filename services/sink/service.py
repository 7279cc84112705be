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

from schemas import CostRecord
from services.sink.store import CostStore
from shared import kafka
from shared.codec import decode
from shared.errors import UndecodableMessage
from shared.outcomes import Outcomes
from shared.topics import Topics

log = logging.getLogger(__name__)


class Sink:
    def __init__(self, *, bootstrap: str, topics: Topics, store: CostStore, max_batch_rows: int = 10_000,
                 flush_interval_s: float = 1.0, group_id: str = "sink"):
        self._bootstrap = bootstrap
        self._topics = topics
        self._store = store
        self._max_batch_rows = max_batch_rows
        self._flush_interval_s = flush_interval_s
        self._group_id = group_id
        self.inserted = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with kafka.consuming(self._bootstrap, [self._topics.costs], group_id=self._group_id) as (
            consumer, producer
        ):
            log.info("sink consuming %s into ClickHouse (batches of up to %d rows or %.1f s)",
                     self._topics.costs, self._max_batch_rows, self._flush_interval_s)
            await self._consume(consumer, Outcomes(producer, self._topics), stop)

    async def _consume(self, consumer, outcomes: Outcomes, stop: asyncio.Event) -> None:
        rows: list[CostRecord] = []
        offsets: dict = {}
        first_buffered = None
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=self._max_batch_rows - len(rows))
            for tp, records in batch.items():
                for record in records:
                    try:
                        rows.append(decode(CostRecord, record.value))
                    except UndecodableMessage as exc:
                        await asyncio.gather(*await outcomes.dead_letter(record, exc.code, str(exc)))
                offsets[tp] = records[-1].offset + 1
            if offsets and first_buffered is None:
                first_buffered = time.monotonic()
            due = first_buffered is not None and time.monotonic() - first_buffered >= self._flush_interval_s
            if len(rows) >= self._max_batch_rows or (offsets and due):
                await self._flush(consumer, rows, offsets)
                rows, offsets, first_buffered = [], {}, None
        if offsets:
            await self._flush(consumer, rows, offsets)

    async def _flush(self, consumer, rows: list[CostRecord], offsets: dict) -> None:
        # (1) insert, (2) commit: see the module docstring.
        await asyncio.to_thread(self._store.insert, rows)
        await consumer.commit(offsets)
        self.inserted += len(rows)
        log.debug("inserted %d cost records", len(rows))
