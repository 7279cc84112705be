"""Two workers in one group on real parts: one is stopped mid-load, gently (SIGTERM: it drains) or
not (SIGKILL: Kafka redelivers what it had); either way every request gets its answer, and each
is billed once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid

import pytest

from schemas import InferenceResult, ModelHealth, Status
from shared import kafka
from shared.codec import decode
from tests.integration.conftest import kill_group, replies_on, start_worker, wait_for_rows

pytestmark = pytest.mark.integration

REQUESTS = 40


async def second_worker(broker, redis_url, topics, policy_file, model_path):
    """Start another `worker --model small` and wait until the group has given it partitions."""
    proc, lines = await asyncio.to_thread(start_worker, broker, redis_url, topics, policy_file, model_path)
    name = f"{socket.gethostname()}:{proc.pid}"
    report = await next_report(broker, topics, lambda h: h.worker == name and h.partition_backlog, 120)
    assert report is not None, "the second worker never got partitions:\n" + "".join(lines[-30:])
    return proc, name, lines


async def next_report(broker, topics, wanted, timeout_s: float) -> ModelHealth | None:
    reader = kafka.consumer(broker, topics.health, group_id=None, auto_offset_reset="latest")
    await reader.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            for records in (await reader.getmany(timeout_ms=500)).values():
                for record in records:
                    health = decode(ModelHealth, record.value)
                    if health.model == "small" and wanted(health):
                        return health
        return None
    finally:
        await reader.stop()


async def load_and_stop(client, broker, topics, worker_name: str, how: signal.Signals, proc,
                        lines: list[str]) -> list[InferenceResult]:
    who = f"c{uuid.uuid4().hex[:8]}"
    # The seeded story of test_worker's deadline test has no end-of-sequence token in its first
    # 1000 tokens, so every request runs its whole max_tokens and is still generating when the
    # signal comes (unseeded stories could all stop early, between the report and the signal).
    # A tenant each: none is answered as a repeat of another, and since the prefix hash holds the
    # tenant, they spread over both workers' partitions.
    sending = [asyncio.create_task(client.complete(
        tenant=f"{who}-{i}", route="long", max_tokens=900, temperature=1.0, seed=7, timeout_s=300,
        messages=[{"role": "user", "content": "write a very long story"}])) for i in range(REQUESTS)]
    # Stop it while it has requests of its own in flight.
    busy = await next_report(broker, topics, lambda h: h.worker == worker_name and h.in_flight > 0, 120)
    assert busy is not None, "the second worker never took a request:\n" + "".join(lines[-30:])
    if how == signal.SIGKILL:
        os.killpg(proc.pid, how)  # the whole worker dies at once, engine processes too, as a container does
    else:
        os.kill(proc.pid, how)
    return await asyncio.gather(*sending)


async def test_sigterm_drains_in_flight_work_and_exits_cleanly(worker, router, sink, client, store, broker,
                                                              redis_url, topics, policy_file, model_path):
    proc, name, lines = await second_worker(broker, redis_url, topics, policy_file, model_path)
    try:
        results = await load_and_stop(client, broker, topics, name, signal.SIGTERM, proc, lines)
        code = await asyncio.to_thread(proc.wait, 90)
    finally:
        kill_group(proc)
    assert code == 0, "".join(lines[-30:])
    assert any("draining" in line for line in lines), "".join(lines[-30:])
    assert all(r.status == Status.ok for r in results), [r.error for r in results if r.status != Status.ok]
    assert all(r.tokens_out == 900 for r in results), [r.tokens_out for r in results]
    # Drained and committed: nothing it had finished was handed to the other worker to send again.
    replies = await replies_on(broker, topics.replies(client.reply_to), {r.request_id for r in results})
    assert {rid: len(v) for rid, v in replies.items()} == {r.request_id: 1 for r in results}


async def test_a_worker_killed_mid_load_loses_nothing_and_bills_each_request_once(
        worker, router, sink, client, store, policies, broker, redis_url, topics, policy_file, model_path):
    proc, name, lines = await second_worker(broker, redis_url, topics, policy_file, model_path)
    try:
        results = await load_and_stop(client, broker, topics, name, signal.SIGKILL, proc, lines)
    finally:
        kill_group(proc)
    assert len({r.request_id for r in results}) == REQUESTS
    assert all(r.status == Status.ok for r in results), [r.error for r in results if r.status != Status.ok]
    # A request may be answered twice (finished, not yet committed, redelivered), but only ever
    # from its record: the same bytes, never a second run.
    replies = await replies_on(broker, topics.replies(client.reply_to), {r.request_id for r in results})
    assert set(replies) == {r.request_id for r in results}
    assert all(len(set(copies)) == 1 for copies in replies.values())
    who = results[0].tenant.rpartition("-")[0]
    books = await wait_for_rows(store, "startsWith(tenant, {t:String})", REQUESTS, {"t": f"{who}-"}, timeout_s=60)
    price = policies.models["small"].price
    assert books["records"] == REQUESTS
    assert books["cost_nano_usd"] == sum(price.cost_nano_usd(r.tokens_in, r.tokens_out) for r in results)
