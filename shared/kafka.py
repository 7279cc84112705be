"""Kafka plumbing every service shares: producers, consumers, admin clients and topic creation through
aiokafka, each speaking the process's security settings (SWITCHYARD_KAFKA_*)."""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaConnectionError, KafkaError
from aiokafka.helpers import create_ssl_context

from shared.errors import ConfigError, DependencyUnavailable
from shared.settings import KafkaSecurity, kafka_fetch_wait_ms
from shared.topics import TopicSpec

log = logging.getLogger(__name__)

# Kafka's TopicAlreadyExists error code, as returned in a CreateTopics response.
TOPIC_ALREADY_EXISTS = 36


def security_options(security: KafkaSecurity) -> dict[str, Any]:
    """The aiokafka arguments that `security` stands for, the same for producers, consumers and admin
    clients. The password is revealed here, to aiokafka, and nowhere else."""
    options: dict[str, Any] = {"security_protocol": security.protocol}
    if security.tls:
        try:
            # No CA file: the system's CAs, as a broker with a public certificate needs.
            options["ssl_context"] = create_ssl_context(cafile=security.ssl_cafile, certfile=security.ssl_certfile,
                                                        keyfile=security.ssl_keyfile, password=_no_key_password)
        except (ssl.SSLError, OSError) as exc:
            named = [f"{name}={path}" for name, path in (("SWITCHYARD_KAFKA_SSL_CAFILE", security.ssl_cafile),
                                                         ("SWITCHYARD_KAFKA_SSL_CERTFILE", security.ssl_certfile),
                                                         ("SWITCHYARD_KAFKA_SSL_KEYFILE", security.ssl_keyfile)) if path]
            raise ConfigError(f"could not load the Kafka TLS files ({', '.join(named) or 'the system CAs'}): "
                              f"{exc}; each must be PEM, and the key the certificate's") from None
    if security.sasl:
        options.update(sasl_mechanism=security.sasl_mechanism, sasl_plain_username=security.sasl_username,
                       sasl_plain_password=security.sasl_password.reveal())
    return options


@functools.cache
def security() -> dict[str, Any]:
    """The process's security options, read from SWITCHYARD_KAFKA_* once: every client built here takes them."""
    return security_options(KafkaSecurity.from_env())


@functools.cache
def fetch_wait_ms() -> int:
    """The process's SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS, read once."""
    return kafka_fetch_wait_ms()


# Consumers off the request path (the live policy and eval suites, health reports, cost records on
# their way to the books, sampled answers for the evaluator) wait at least this long at the broker
# for a fetch. A record waits at most that long for them, which none of them minds, while an idle one
# asks a tenth as often as a consumer on the request path. Tansu answers a fetch only when its wait
# ends, so every idle consumer polls: at 50 ms each one cost about 0.045 of a core here (the broker's
# work and the client's together), and a stack has a dozen.
OFF_PATH_FETCH_WAIT_MS = 500


def _no_key_password() -> str:
    # Without a callback OpenSSL would ask for the pass phrase on the terminal, hanging a service.
    raise ConfigError("SWITCHYARD_KAFKA_SSL_KEYFILE is encrypted; give the client key without a pass phrase")


def producer(bootstrap: str, **overrides) -> AIOKafkaProducer:
    options = dict(
        **security(),
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=2,
        max_request_size=4 * 1024 * 1024,
        request_timeout_ms=30_000,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(bootstrap: str, *topics: str, group_id: str | None, off_path: bool = False,
             **overrides) -> AIOKafkaConsumer:
    """A consumer that commits by hand: services commit only what they have finished. `off_path`:
    one that no request waits for (OFF_PATH_FETCH_WAIT_MS)."""
    options = dict(
        **security(),
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_wait_ms=max(fetch_wait_ms(), OFF_PATH_FETCH_WAIT_MS) if off_path else fetch_wait_ms(),
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def admin(bootstrap: str, **overrides) -> AIOKafkaAdminClient:
    """An admin client (topics, configs, consumer groups), speaking the same security as the rest."""
    return AIOKafkaAdminClient(**{**security(), "bootstrap_servers": bootstrap, **overrides})


@asynccontextmanager
async def consuming(bootstrap: str, topics: list[str], *, group_id: str, listener=None,
                    off_path: bool = False) -> AsyncIterator[tuple[AIOKafkaConsumer, AIOKafkaProducer]]:
    """A started consumer in `group_id`, subscribed to `topics`, and a producer for what it emits."""
    consumer_ = consumer(bootstrap, group_id=group_id, off_path=off_path)
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
        client = admin(bootstrap, request_timeout_ms=5000)
        try:
            await client.start()
            await client.list_topics()
            return
        except (KafkaError, OSError) as exc:
            last = exc
            await asyncio.sleep(0.2)
        finally:
            await client.close()
    hint = "check SWITCHYARD_BOOTSTRAP or leave it unset to start the embedded broker"
    protocol = security()["security_protocol"]
    if protocol != "PLAINTEXT":
        # A refused TLS handshake or login reads as silence here: aiokafka logs the cause and raises no more.
        hint = (f"check SWITCHYARD_BOOTSTRAP and the SWITCHYARD_KAFKA_* settings (protocol {protocol}); "
                "aiokafka's log lines say what the broker refused")
    raise DependencyUnavailable(f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f} s ({last}); {hint}")


async def ensure_topics(bootstrap: str, specs: list[TopicSpec], replication_factor: int = 1) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    client = admin(bootstrap, request_timeout_ms=30_000)
    try:
        await client.start()
        existing = set(await client.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if not missing:
            return []
        response = await client.create_topics(
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
        await client.close()


async def prepare(bootstrap: str, specs: list[TopicSpec], replication_factor: int = 1,
                  timeout_s: float = 30.0) -> list[str]:
    """Wait for the broker and create the missing topics; one line per topic saying which."""
    await wait_for_broker(bootstrap, timeout_s)
    created = await ensure_topics(bootstrap, specs, replication_factor)
    return [f"{'created' if s.name in created else 'exists '} {s.name} ({s.partitions} partitions)" for s in specs]
