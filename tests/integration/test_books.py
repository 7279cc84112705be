"""The cost books on the real ClickHouse engine (chDB), and the client's clear timeout."""

from __future__ import annotations

import time
import uuid

import pytest

from schemas import CostRecord, Status
from shared.client import Client
from shared.errors import RequestTimeout

pytestmark = pytest.mark.integration


def records(tenant: str, n: int) -> list[CostRecord]:
    now = int(time.time() * 1000)
    return [CostRecord(request_id=f"{tenant}-{i}", ts_ms=now + i, tenant=tenant, route="chat", model="small",
                       priority="standard", status=Status.ok, tokens_in=100 + i, tokens_out=10,
                       cost_nano_usd=(100 + i) * 150 + 10 * 600, latency_ms=i) for i in range(n)]


def test_a_batch_inserted_twice_counts_once(store):
    # What the sink does when it dies between insert and commit: the batch comes again.
    tenant = f"replay-{uuid.uuid4().hex[:6]}"
    batch = records(tenant, 500)
    store.insert(batch)
    store.insert(batch)
    (row,) = store.query(
        "SELECT count() AS n, sum(tokens_in) AS tokens_in, sum(cost_nano_usd) AS cost FROM switchyard.cost_records "
        "FINAL WHERE tenant = {t:String}", {"t": tenant})
    assert row["n"] == 500
    assert row["tokens_in"] == sum(r.tokens_in for r in batch)
    assert row["cost"] == sum(r.cost_nano_usd for r in batch)
    (hourly,) = store.query("SELECT sum(requests) AS n FROM switchyard.cost_by_hour WHERE tenant = {t:String}",
                            {"t": tenant})
    assert hourly["n"] == 500


async def test_a_result_that_never_comes_raises_a_clear_timeout(broker, topics):
    # No router is running for this prefix, so nothing will answer.
    async with Client(broker, reply_to="lonely", topics=type(topics)("nobody-home")) as client:
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match="no result for request .* within 1.0 s; is a router running"):
            await client.complete(tenant="acme", route="chat", prompt="hello?", timeout_s=1.0)
        assert time.monotonic() - started < 10


class DiesAfterInsert:
    """The real store, but the sink 'dies' right after its first insert, before it can commit."""

    def __init__(self, store):
        self._store = store
        self.died = False

    def insert(self, rows):
        self._store.insert(rows)
        if not self.died:
            self.died = True
            raise SystemExit("killed between insert and commit")


async def test_a_sink_killed_between_insert_and_commit_books_every_record_exactly_once(broker, store):
    import asyncio

    from shared import kafka
    from shared.codec import encode
    from shared.topics import Topics
    from services.sink.service import Sink

    topics = Topics(f"replay{uuid.uuid4().hex[:6]}")
    await kafka.ensure_topics(broker, topics.plan([]))
    tenant = f"kill-{uuid.uuid4().hex[:6]}"
    batch = records(tenant, 300)
    producer = kafka.producer(broker)
    await producer.start()
    try:
        for record in batch:
            await producer.send(topics.costs, encode(record), key=record.request_id.encode())
        await producer.send_and_wait(topics.costs, b'{"not": "a cost record"}', key=b"bad")
    finally:
        await producer.stop()

    dying = DiesAfterInsert(store)
    with pytest.raises(SystemExit):
        await Sink(bootstrap=broker, topics=topics, store=dying, flush_interval_s=0.5).run(asyncio.Event())
    assert dying.died

    stop = asyncio.Event()
    restarted = asyncio.create_task(Sink(bootstrap=broker, topics=topics, store=store, flush_interval_s=0.2).run(stop))
    await asyncio.sleep(3)
    stop.set()
    await restarted
    (row,) = store.query("SELECT count() AS n, sum(cost_nano_usd) AS cost FROM switchyard.cost_records FINAL "
                         "WHERE tenant = {t:String}", {"t": tenant})
    assert row["n"] == 300 and row["cost"] == sum(r.cost_nano_usd for r in batch)

    dead = kafka.consumer(broker, topics.dead_letter, group_id=None)
    await dead.start()
    try:
        letters = await dead.getmany(timeout_ms=3000)
    finally:
        await dead.stop()
    reasons = [r.value for recs in letters.values() for r in recs]
    # Dead letters are at least once: the batch the first sink never committed is read again.
    assert reasons and all(b"not a valid CostRecord" in r for r in reasons)
