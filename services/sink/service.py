"""The sink: cost records from the costs topic, and quality scores from the scores topic, into
ClickHouse, in batches.

The order is what makes the books exact: (1) insert the batch, (2) commit its offsets.
If the sink dies after (1) and before (2), the batch is read and inserted again; the table
is a ReplacingMergeTree keyed on (request, attempt), and every read uses FINAL, so the
second copy never counts. Committing before inserting could lose records; never do that.

Speed: each record is validated once by pydantic (a bad one is dead-lettered with the reason)
and written back as canonical JSON; ClickHouse parses the batch itself (JSONEachRow), so no
Python code builds rows column by column.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from schemas import CostRecord
from schemas.quality import ScoreRecord
from services.sink import metrics
from services.sink.store import CostStore
from shared import kafka
from shared import metrics as shared_metrics
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
        self._fetched = shared_metrics.CONSUMER_BATCH.labels(group_id)
        self._kinds = {topics.costs: CostRecord, topics.scores: ScoreRecord}
        # What this sink has done: records booked, and when it took its first and booked its last.
        self.booked = 0
        self.scored = 0
        self.first_taken_at: float | None = None
        self.last_booked_at: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        async with kafka.consuming(self._bootstrap, list(self._kinds), group_id=self._group_id, off_path=True) as (
            consumer, producer
        ):
            log.info("sink consuming %s into ClickHouse (batches of up to %d rows or %.1f s)",
                     " and ".join(self._kinds), self._max_batch_rows, self._flush_interval_s)
            lag = asyncio.create_task(shared_metrics.track_lag(consumer, self._group_id, stop))
            try:
                await self._consume(consumer, Outcomes(producer, self._topics), stop)
            finally:
                lag.cancel()
                await asyncio.gather(lag, return_exceptions=True)

    async def _consume(self, consumer, outcomes: Outcomes, stop: asyncio.Event) -> None:
        pending: list[tuple[ConsumerRecord, CostRecord | ScoreRecord]] = []
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
            if batch:
                self._fetched.observe(sum(len(records) for records in batch.values()))
                if self.first_taken_at is None:
                    self.first_taken_at = time.monotonic()
            for tp, records in batch.items():
                for record in records:
                    try:
                        pending.append((record, _validate(self._kinds[record.topic], record.value)))
                    except UndecodableMessage as exc:
                        metrics.RECORDS.labels("dead_lettered").inc()
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

    async def _flush(self, consumer, pending: list[tuple[ConsumerRecord, CostRecord | ScoreRecord]], offsets: dict,
                     outcomes: Outcomes) -> None:
        # (1) insert, (2) commit: see the module docstring.
        rows = [row for _, row in pending]
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._insert, rows)
        except Exception as exc:  # clickhouse-connect raises several types for one bad row
            rows = await self._insert_one_by_one(pending, exc, outcomes)
        if rows:
            metrics.INSERT_SECONDS.observe(time.perf_counter() - started)
            metrics.BATCH_ROWS.observe(len(rows))
        await kafka.commit(consumer, offsets)
        costs = [row for row in rows if isinstance(row, CostRecord)]
        self.booked += len(costs)
        self.scored += len(rows) - len(costs)
        self.last_booked_at = time.monotonic()
        metrics.RECORDS.labels("inserted").inc(len(rows))
        _count(costs)
        log.debug("inserted %d cost records and %d scores", len(costs), len(rows) - len(costs))

    def _insert(self, rows: list[CostRecord | ScoreRecord]) -> None:
        costs = [row for row in rows if isinstance(row, CostRecord)]
        scores = [row for row in rows if isinstance(row, ScoreRecord)]
        if costs:
            self._store.insert(costs)
        if scores:
            self._store.insert_scores(scores)

    async def _insert_one_by_one(self, pending, batch_error: Exception,
                                 outcomes: Outcomes) -> list[CostRecord | ScoreRecord]:
        """Find the rows ClickHouse refuses and dead-letter them, so one bad row cannot stop the books;
        the rows inserted. If every row fails, ClickHouse itself is the problem: raise, commit
        nothing, retry on restart."""
        refused, inserted = [], []
        for record, row in pending:
            try:
                await asyncio.to_thread(self._insert, [row])
                inserted.append(row)
            except Exception as exc:
                refused.append((record, exc))
        if len(refused) == len(pending):
            raise batch_error
        for record, exc in refused:
            metrics.RECORDS.labels("dead_lettered").inc()
            await delivered(outcomes.dead_letter(record, "unbookable", f"ClickHouse refused the row: {exc}"))
        return inserted


def _validate(kind: type[CostRecord] | type[ScoreRecord], value: bytes | None) -> CostRecord | ScoreRecord:
    """The record, validated; UndecodableMessage saying what is wrong otherwise."""
    try:
        return kind.model_validate_json(value)
    except (ValidationError, TypeError, ValueError):
        # The way every service decodes: it says what is wrong (UndecodableMessage) the same way.
        return decode(kind, value)


def _count(rows: list[CostRecord]) -> None:
    """The booked-spend metrics for one batch: summed per label set first, so a batch of 10,000
    rows costs a few dozen metric updates, not 10,000. A batch read again after a crash counts
    again here (the books do not)."""
    cost: Counter = Counter()
    tokens: Counter = Counter()
    booked: Counter = Counter()
    for row in rows:
        tenant = shared_metrics.tenant_label(row.tenant)
        route = shared_metrics.route_label(row.route)
        cost[(tenant, route, row.model)] += row.cost_nano_usd
        tokens[(tenant, "in")] += row.tokens_in
        tokens[(tenant, "out")] += row.tokens_out
        if row.attempt == 0:
            booked[(route, row.model, row.status.value, row.cache_hit.value)] += 1
    for labels, nano in cost.items():
        if nano:
            metrics.COST.labels(*labels).inc(nano / 1e9)
    for labels, count in tokens.items():
        if count:
            metrics.TOKENS.labels(*labels).inc(count)
    for labels, count in booked.items():
        metrics.BOOKED.labels(*labels).inc(count)


async def _at_end(consumer) -> bool:
    assigned = consumer.assignment()
    if not assigned:
        return True
    ends = await consumer.end_offsets(list(assigned))
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True
