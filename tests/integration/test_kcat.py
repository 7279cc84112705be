"""The worked example of docs/producers.md, run as written with the real kcat against a fresh
Tansu (so the doc's default `switchyard` prefix clashes with nothing): the request it produces
is on the requests topic keyed by its route, where a murmur2 client would put it, and is a valid
InferenceRequest; a result published as a worker does is what its consume command prints.
The routed loop itself (router, vLLM worker) is covered by test_end_to_end.py."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from schemas import InferenceRequest, InferenceResult, Status
from services.stack import infra
from shared import kafka
from shared.codec import decode, encode
from shared.topics import Topics, reply_key
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

DOC = ROOT / "docs" / "producers.md"
SECTION = "## Worked example: kcat"
# Older librdkafka misreads the tagged fields of Tansu's ApiVersions answer and never connects.
MIN_LIBRDKAFKA = (2, 1)
TOPICS = Topics()  # the doc's default prefix


def worked_example() -> list[str]:
    """The ```sh blocks of the doc's kcat section, in order."""
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def tools_path() -> str:
    """PATH as after `source .venv/bin/activate`: the venv's python, switchyard and kcat first."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def require_kcat(path: str) -> str:
    found = shutil.which("kcat", path=path)
    if found is None:
        pytest.fail("kcat is not installed: run ./scripts/setup")
    version = subprocess.run([found, "-V"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"librdkafka (\d+)\.(\d+)", version)
    if match and (int(match[1]), int(match[2])) < MIN_LIBRDKAFKA:
        pytest.fail(f"{found} links librdkafka {match[1]}.{match[2]}, which cannot read Tansu's ApiVersions answer: "
                    "run ./scripts/setup (it gives kcat a newer librdkafka)")
    return found


def run(block: str, broker: str, path: str) -> subprocess.CompletedProcess:
    # Only what the doc sets: no SWITCHYARD_* of the caller's (a prefix would move every topic).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
    env.update(BROKER=broker, PATH=path)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"{block}\nexited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def fresh_broker() -> str:
    proc = infra.start_broker(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield proc.address
    proc.stop()


def test_the_documented_kcat_commands_send_a_valid_request_and_read_its_result(fresh_broker):
    path = tools_path()
    require_kcat(path)
    blocks = worked_example()
    produce = [b for b in blocks if b.startswith("kcat -P")]
    consume = [b for b in blocks if b.startswith("kcat -C")]
    assert len(produce) == 1 and len(consume) == 1, blocks
    assert blocks.index(produce[0]) < blocks.index(consume[0]) == len(blocks) - 1

    for block in blocks[:blocks.index(produce[0]) + 1]:  # topics, the reply topic, the request
        run(block, fresh_broker, path)

    [(partition, key, request)] = asyncio.run(_requests(fresh_broker))
    assert key == b"chat" and request.route == "chat" and request.reply_to == "kcat-demo"
    assert request.priority.value == "standard"
    partitions = list(range(6))
    assert partition == DefaultPartitioner()(b"chat", partitions, partitions), "not where a murmur2 client puts it"

    result = InferenceResult(request_id=request.id, tenant=request.tenant, route=request.route, status=Status.ok,
                             output="Hello from the worker.", model="small", tokens_in=14, tokens_out=5)
    asyncio.run(_reply(fresh_broker, request, result))

    printed = run(consume[0], fresh_broker, path).stdout.splitlines()
    assert printed == [encode(result).decode()]
    assert decode(InferenceResult, printed[0].encode()).request_id == "kcat-demo-0001"


async def _requests(broker: str) -> list[tuple[int, bytes, InferenceRequest]]:
    """Every record on the standard requests topic, decoded."""
    reader = kafka.consumer(broker, group_id=None)
    await reader.start()
    try:
        topic = TOPICS.requests("standard")
        await reader.topics()  # metadata, for partitions_for_topic
        tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        end = await reader.end_offsets(tps)
        out = []
        while [tp for tp in tps if await reader.position(tp) < end[tp]]:
            for records in (await reader.getmany(*tps, timeout_ms=500)).values():
                out += [(r.partition, r.key, decode(InferenceRequest, r.value)) for r in records]
        return out
    finally:
        await reader.stop()


async def _reply(broker: str, request: InferenceRequest, result: InferenceResult) -> None:
    """As a worker answers: the result on the request's reply topic, keyed by its id."""
    producer = kafka.producer(broker)
    await producer.start()
    try:
        await producer.send_and_wait(TOPICS.replies(request.reply_to), encode(result), key=reply_key(request.id))
    finally:
        await producer.stop()
