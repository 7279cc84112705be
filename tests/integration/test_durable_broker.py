"""Tansu storing in S3 (moto on loopback), as the broker-restart drill runs it: a fetch must list
the partition's objects within its wait, and one cut short answers nothing at all, with no error.
So a consumer at the default 50 ms wait never reads a partition of many objects, and one at the
durable rig's wait reads it whole. If Tansu ever answers the short fetch, the first half fails and
the longer wait (services/chaos/rig.py) can go."""

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

# Each produce request is one object. Here the default wait read nothing of 2,000 objects when the
# machine was quiet, nor of 500 with both cores busy; the durable wait read 2,000 in 5 s.
OBJECTS = 2500


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


async def _read(bootstrap: str, wait_ms: int, within_s: float) -> int:
    consumer = kafka.consumer(bootstrap, group_id=None, fetch_max_wait_ms=wait_ms)
    await consumer.start()
    try:
        tp = TopicPartition("many", 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        read, deadline = 0, time.monotonic() + within_s
        while read < OBJECTS and time.monotonic() < deadline:
            read += sum(len(records) for records in (await consumer.getmany(tp, timeout_ms=1000)).values())
        return read
    finally:
        await consumer.stop()


async def test_a_partition_of_many_objects_is_read_only_with_the_durable_rigs_fetch_wait(durable_broker):
    await kafka.ensure_topics(durable_broker, [TopicSpec("many", 1)])
    producer = kafka.producer(durable_broker, linger_ms=0)
    await producer.start()
    try:
        for i in range(OBJECTS):  # one at a time: one record batch, one object, each
            await producer.send_and_wait("many", b"%d" % i)
    finally:
        await producer.stop()

    assert await _read(durable_broker, FETCH_MAX_WAIT_MS, within_s=10) < OBJECTS
    assert await _read(durable_broker, DURABLE_FETCH_WAIT_MS, within_s=60) == OBJECTS
