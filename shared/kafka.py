"""Kafka plumbing every service shares: producers, consumers and topic creation through aiokafka."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaConnectionError, KafkaError

from shared.errors import DependencyUnavailable
from shared.topics import TopicSpec

log = logging.getLogger(__name__)

# Kafka's TopicAlreadyExists error code, as returned in a CreateTopics response.
TOPIC_ALREADY_EXISTS = 36


def producer(bootstrap: str, **overrides) -> AIOKafkaProducer:
    options = dict(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=2,
        max_request_size=4 * 1024 * 1024,
        request_timeout_ms=30_000,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(bootstrap: str, *topics: str, group_id: str | None, **overrides) -> AIOKafkaConsumer:
    """A consumer that commits by hand: services commit only what they have finished."""
    options = dict(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_wait_ms=50,
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


@asynccontextmanager
async def consuming(bootstrap: str, topics: list[str], *, group_id: str,
                    listener=None) -> AsyncIterator[tuple[AIOKafkaConsumer, AIOKafkaProducer]]:
    """A started consumer in `group_id`, subscribed to `topics`, and a producer for what it emits."""
    consumer_ = consumer(bootstrap, group_id=group_id)
    producer_ = producer(bootstrap)
    await producer_.start()
    try:
        await consumer_.start()
        try:
            consumer_.subscribe(topics, listener=listener)
            yield consumer_, producer_
        finally:
            await consumer_.stop()
    finally:
        await producer_.stop()


async def commit(consumer: AIOKafkaConsumer, offsets: dict | None = None) -> bool:
    """Commit, and survive a rebalance that took the partitions away meanwhile: their records
    are read again by the new owner, which every service tolerates. False if it did not commit."""
    try:
        await consumer.commit(offsets)
        return True
    except (CommitFailedError, IllegalStateError) as exc:
        log.warning("commit skipped after a rebalance: %s", exc)
        return False


def rewind(consumer: AIOKafkaConsumer, offsets: dict) -> None:
    """Seek back to read records again, on the partitions this consumer still owns."""
    owned = consumer.assignment()
    for tp, offset in offsets.items():
        if tp in owned:
            consumer.seek(tp, offset)


async def lag(consumer: AIOKafkaConsumer) -> dict:
    """Records waiting on each owned partition (high watermark minus position), for the partitions
    a fetch has reported a high watermark for. Asks the broker nothing."""
    out = {}
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is not None:
            out[tp] = max(0, highwater - await consumer.position(tp))
    return out


async def from_start(consumer: AIOKafkaConsumer, topic: str, timeout_s: float | None = None) -> AsyncIterator:
    """Every record on `topic` from its beginning up to its end as it is now (or until `timeout_s`).
    The consumer (one without a group) is left assigned every partition, positioned after them,
    so it can go on to read what comes next."""
    from aiokafka.structs import TopicPartition

    await consumer.topics()
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not parts:
        return
    consumer.assign(parts)
    await consumer.seek_to_beginning(*parts)
    end = await consumer.end_offsets(parts)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while deadline is None or time.monotonic() < deadline:
        if all([await consumer.position(tp) >= end[tp] for tp in parts]):
            return
        for records in (await consumer.getmany(*parts, timeout_ms=500)).values():
            for record in records:
                yield record


async def wait_for_broker(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Return once the broker answers metadata requests, or raise DependencyUnavailable."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except (KafkaError, OSError) as exc:
            last = exc
            await asyncio.sleep(0.2)
        finally:
            await admin.close()
    raise DependencyUnavailable(
        f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f} s ({last}); "
        "check SWITCHYARD_BOOTSTRAP or leave it unset to start the embedded broker"
    )


async def ensure_topics(bootstrap: str, specs: list[TopicSpec], replication_factor: int = 1) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if not missing:
            return []
        response = await admin.create_topics(
            [NewTopic(s.name, num_partitions=s.partitions, replication_factor=replication_factor, topic_configs=s.config)
             for s in missing]
        )
        for name, code, *rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                message = rest[0] if rest else ""
                raise DependencyUnavailable(f"could not create topic {name}: error {code} {message}")
        created = [s.name for s in missing]
        log.info("created topics %s", ", ".join(created))
        return created
    except KafkaConnectionError as exc:
        raise DependencyUnavailable(f"could not reach the broker at {bootstrap} to create topics: {exc}") from exc
    finally:
        await admin.close()


async def prepare(bootstrap: str, specs: list[TopicSpec], replication_factor: int = 1,
                  timeout_s: float = 30.0) -> list[str]:
    """Wait for the broker and create the missing topics; one line per topic saying which."""
    await wait_for_broker(bootstrap, timeout_s)
    created = await ensure_topics(bootstrap, specs, replication_factor)
    return [f"{'created' if s.name in created else 'exists '} {s.name} ({s.partitions} partitions)" for s in specs]
