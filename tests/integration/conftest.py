"""Real parts for integration tests, one of each per session: a Tansu broker, a redis-server,
a chDB store, and a worker process running the real vLLM engine on a tiny model. Router and
sink run inside the test's event loop, so each test can start them fresh."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from redis.asyncio import Redis

from schemas import InferenceResult
from services.router import train
from services.router.classify import Classifier, Model
from services.router.embed import Embedder
from services.router.static_embed import StaticEmbedder
from services.router.feed import PolicyFeed
from services.router.health import HealthBoard
from services.router.policy import load
from services.router.limits import TenantLimiter
from services.router.seen import ForwardedLog
from services.router.service import Router
from services.sink.service import Sink
from services.sink.store import CostStore
from services.stack import infra
from services.worker import tiny_model
from shared import kafka
from shared.client import Client
from shared.codec import decode
from shared.kafka import ensure_topics
from shared.memory import Memory
from shared.semantic import SemanticIndex
from shared.topics import Topics

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["small", "large", "big", "flaky", "jsonish"]
WORKER_READY_TIMEOUT_S = 600
# Headless Chromium on a machine with no way out: no sandbox (tests may run as root), and none of
# the background connections it would otherwise try at every start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The Chromium that browser tests drive: SWITCHYARD_CHROMIUM, or the one ./scripts/setup installs."""
    path = os.environ.get("SWITCHYARD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium for the browser tests: run ./scripts/setup, or set SWITCHYARD_CHROMIUM")
    return path

POLICY = """
version: "test-1"
unknown_route: reject
models:
  small: {tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.60, max_context_tokens: 1024,
          max_error_rate: 0.5, supports_json_schema: true}
  # No worker serves "large": tests read what the router forwards to it off its topic.
  large: {tier: large, price_in_usd_per_mtok: 2.50, price_out_usd_per_mtok: 10.00, max_context_tokens: 1024}
  # Served in-process by tests of hand-offs: "big" answers escalations, "flaky" refuses every call.
  big: {tier: large, price_in_usd_per_mtok: 2.00, price_out_usd_per_mtok: 8.00, max_context_tokens: 1024,
        supports_json_schema: true}
  flaky: {tier: small, price_in_usd_per_mtok: 0.05, price_out_usd_per_mtok: 0.20, max_context_tokens: 1024}
  # Served in-process by the output check's tests: a provider whose first JSON is wrong.
  jsonish: {tier: small, price_in_usd_per_mtok: 0.10, price_out_usd_per_mtok: 0.40, max_context_tokens: 1024,
            supports_json_schema: true}
routes:
  chat: {models: [small], max_output_tokens: 16}
  short: {models: [small], max_output_tokens: 4}
  tiered: {models: [small, large], max_output_tokens: 8}
  cached: {models: [small], max_output_tokens: 8, cache: {exact: true, semantic: true, semantic_threshold: 0.9}}
  fast-cached: {models: [small], max_output_tokens: 8,
                cache: {semantic: true, semantic_embedder: static, semantic_threshold: 0.9}}
  shared-cache: {models: [small], max_output_tokens: 8, cache: {exact: true, shared: true}}
  long: {models: [small], max_output_tokens: 1000}
  escalating: {models: [small, big], max_output_tokens: 8, escalate_below_confidence: 0.9}
  moving-on: {models: [flaky, small], max_output_tokens: 8}
  large-only: {models: [large], max_output_tokens: 8}
  guarded: {models: [small], max_output_tokens: 8, guardrails: {pii: redact, injection: block}}
  no-personal-data: {models: [small], max_output_tokens: 8, guardrails: {pii: block}}
  guarded-similar: {models: [small], max_output_tokens: 8, guardrails: {injection: block, injection_similarity: 0.85}}
  json: {models: [small], max_output_tokens: 8}
  json-remote: {models: [jsonish], max_output_tokens: 16}
  # Eval suites and drift (test_quality.py): answered and judged by provider stubs in-process.
  graded: {models: [big], max_output_tokens: 8}
  judging: {models: [flaky], max_output_tokens: 4}
tenants:
  limited: {requests_per_minute: 2}
"""


@pytest.fixture(scope="session")
def topics() -> Topics:
    return Topics("sytest")


@pytest.fixture(scope="session")
def broker() -> str:
    proc = infra.start_broker(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield proc.address
    proc.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    proc = infra.start_redis(tmp_path_factory.mktemp("redis"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield proc.address
    proc.stop()


@pytest.fixture(scope="session")
def policy_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture(scope="session")
def policies(policy_file):
    return load(policy_file)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> CostStore:
    # chDB allows one engine per process: the whole session shares this one.
    store = CostStore.connect(f"chdb://{tmp_path_factory.mktemp('chdb')}")
    yield store
    store.close()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return tiny_model.generate(tmp_path_factory.mktemp("models") / "small", layers=2, hidden=128)


@pytest.fixture(scope="session")
def worker(broker, redis_url, topics, policy_file, model_path):
    """One worker process with the real vLLM engine, shared by every test (it takes ~1 min to start)."""
    asyncio.run(ensure_topics(broker, topics.plan(MODELS)))
    proc, lines = start_worker(broker, redis_url, topics, policy_file, model_path)
    proc.lines = lines  # everything it prints, for tests of what its log may carry
    yield proc
    proc.terminate()
    try:
        proc.wait(60)
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill whatever is left of a worker's process group: vLLM's engine processes outlive a worker
    that was killed, and would hold their memory and cores for the rest of the session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def start_worker(broker, redis_url, topics, policy_file, model_path, *extra: str):
    """A `switchyard worker --model small` process, once it consumes; and the lines it has printed."""
    env = dict(os.environ, SWITCHYARD_BOOTSTRAP=broker, SWITCHYARD_POLICY=str(policy_file), SWITCHYARD_REDIS_URL=redis_url,
               SWITCHYARD_TOPIC_PREFIX=topics.prefix, PYTHONUNBUFFERED="1", VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "worker", "--model", "small", "--model-path", str(model_path), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        start_new_session=True,  # its own process group: with the engine's processes, stopped as one
    )
    ready = threading.Event()
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if "consuming" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(WORKER_READY_TIMEOUT_S):
        proc.kill()
        pytest.fail("worker did not start:\n" + "".join(lines[-40:]))
    return proc, lines


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2 embedder, loaded once (a few seconds)."""
    return Embedder()


@pytest.fixture(scope="session")
def static_embedder(tmp_path_factory):
    """The static embedder distilled from MiniLM, as a router builds it on its first start (seconds)."""
    return StaticEmbedder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def classifier_path(tmp_path_factory, embedder) -> Path:
    """A classifier fitted from the bundled labeled prompts, as `switchyard router train` does."""
    path = tmp_path_factory.mktemp("classifier") / "classifier.json"
    train.fit_file(train.BUNDLED, path, embedder=embedder)
    return path


@pytest.fixture
async def router(broker, redis_url, topics, policies, embedder, static_embedder, classifier_path):
    """A router as `switchyard router` runs one: the policy in force on the topic, else the file's;
    the trained classifier, the caches and idempotency in Redis."""
    await ensure_topics(broker, topics.plan(MODELS))
    redis = Redis.from_url(redis_url)
    feed = PolicyFeed(broker, topics)
    semantic = SemanticIndex(redis)
    await semantic.start()
    router = Router(bootstrap=broker, topics=topics, policies=await feed.start() or policies,
                    forwarded=ForwardedLog(redis), limiter=TenantLimiter(redis), feed=feed,
                    classifier=Classifier(Model.load(classifier_path), embedder), embedder=embedder,
                    memory=Memory(redis), semantic=semantic, health=HealthBoard(), static_embedder=static_embedder)
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop))
    router.task = task  # tests check it is still running
    yield router
    stop.set()
    await task
    await semantic.stop()
    await feed.stop()
    await redis.aclose()


@pytest.fixture
async def sink(broker, topics, store):
    sink = Sink(bootstrap=broker, topics=topics, store=store, flush_interval_s=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    yield sink
    stop.set()
    await task


@pytest.fixture
async def client(broker, topics):
    async with Client(broker, reply_to=f"test-{uuid.uuid4().hex[:8]}", topics=topics, timeout_s=120) as client:
        yield client


async def wait_for_rows(store: CostStore, where: str, expected: int, params: dict, timeout_s: float = 30) -> dict:
    """Poll the books until `expected` records match `where` (the sink flushes on a timer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        row = store.query(
            f"SELECT count() AS records, sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out, "
            f"sum(cost_nano_usd) AS cost_nano_usd FROM switchyard.cost_records FINAL WHERE {where}", params
        )[0]
        if row["records"] >= expected or loop.time() > deadline:
            return row
        await asyncio.sleep(0.2)


async def records_on(broker, topic: str) -> list[bytes | None]:
    """The value of every record on `topic`, from its start to its end now."""
    reader = kafka.consumer(broker, group_id=None, auto_offset_reset="earliest")
    await reader.start()
    try:
        return [record.value async for record in kafka.from_start(reader, topic)]
    finally:
        await reader.stop()


async def replies_on(broker, topic: str, ids: set[str]) -> dict[str, list[bytes]]:
    """Every reply on `topic` to the given requests (results, not stream deltas), from the topic's start."""
    seen: dict[str, list[bytes]] = defaultdict(list)
    for value in await records_on(broker, topic):
        if value and b'"kind":"delta"' not in value:
            result = decode(InferenceResult, value)
            if result.request_id in ids:
                seen[result.request_id].append(value)
    return seen
