"""Tansu storing in S3 (moto on loopback), as the broker-restart drill runs it: a fetch must list
the partition's objects within its wait, and one cut short answers nothing at all, with no error.
So a consumer at the default 50 ms wait never reads a partition of many objects, while a wait long
enough for the listing reads it whole: the records are there, the wait is what fails. And the
durable rig's wait reads, whole, a partition several times as large as the drill leaves. If Tansu
ever answers the short fetch, the first assertion fails and the longer wait (services/chaos/rig.py)
can go."""

from __future__ import annotations

import time

import pytest
from aiokafka.structs import TopicPartition

from services.chaos.rig import DURABLE_FETCH_WAIT_MS
from services.stack import infra
from shared import kafka
from shared.settings import FETCH_MAX_WAIT_MS
from shared.topics import TopicSpec

pytestmark = pytest.mark.integration

# Each produce request is one object. The default wait read nothing of 2,000 objects on a quiet
# 2-core Xeon, nor of 500 with both cores busy. How many objects a wait can list depends on the
# machine: on a 2-core EPYC (AVX2) 1000 ms read 200 objects in 2 s, 1,000 in 22 s and 83 of 2,500
# in 30 s, while 10,000 ms read the 2,500 in 28 s.
OBJECTS = 2500
LISTING_WAIT_MS = 10_000  # long enough to list OBJECTS on both machines
# A broker-restart drill leaves 20 to 44 objects a partition; the rig's wait must read several times that.
DRILL_OBJECTS = 200


@pytest.fixture(scope="module")
def durable_broker(tmp_path_factory):
    logs = tmp_path_factory.mktemp("durable")
    store = infra.start_object_store(stdout=open(logs / "moto.log", "ab"), stderr=-2)
    try:
        broker = infra.start_broker(object_store=store.address, stdout=open(logs / "broker.log", "ab"), stderr=-2)
        try:
            yield broker.address
        finally:
            broker.stop()
    finally:
        store.stop()


async def _produce(bootstrap: str, topic: str, objects: int) -> None:
    await kafka.ensure_topics(bootstrap, [TopicSpec(topic, 1)])
    producer = kafka.producer(bootstrap, linger_ms=0)
    await producer.start()
    try:
        for i in range(objects):  # one at a time: one record batch, one object, each
            await producer.send_and_wait(topic, b"%d" % i)
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, objects: int, wait_ms: int, within_s: float) -> int:
    consumer = kafka.consumer(bootstrap, group_id=None, fetch_max_wait_ms=wait_ms)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        read, deadline = 0, time.monotonic() + within_s
        while read < objects and time.monotonic() < deadline:
            read += sum(len(records) for records in (await consumer.getmany(tp, timeout_ms=1000)).values())
        return read
    finally:
        await consumer.stop()


async def test_a_partition_of_many_objects_is_read_only_by_a_fetch_that_waits_for_its_listing(durable_broker):
    await _produce(durable_broker, "many", OBJECTS)
    assert await _read(durable_broker, "many", OBJECTS, FETCH_MAX_WAIT_MS, within_s=10) < OBJECTS
    assert await _read(durable_broker, "many", OBJECTS, LISTING_WAIT_MS, within_s=120) == OBJECTS


async def test_the_durable_rigs_wait_reads_a_partition_several_times_what_the_drill_leaves(durable_broker):
    await _produce(durable_broker, "drill-sized", DRILL_OBJECTS)
    assert await _read(durable_broker, "drill-sized", DRILL_OBJECTS, DURABLE_FETCH_WAIT_MS, within_s=30) == DRILL_OBJECTS
