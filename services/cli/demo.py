"""`switchyard demo`: the local stack under a few hundred requests, and what they cost, read back from ClickHouse."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from schemas import Status, StreamDelta
from services.cli import quality, quality_report
from services.stack.supervisor import LOCAL_GATEWAY_KEY, read_state, state_path
from services.worker import tiny_model
from shared.client import Client
from shared.errors import DependencyUnavailable
from shared.settings import Settings, masked
from shared.topics import Topics

TENANTS = {
    "acme": "You are Acme's support assistant. Answer briefly and politely about orders and returns.",
    "globex": "You are Globex's research helper. Explain the science behind each question step by step.",
    "initech": "You are Initech's code reviewer. Point out the problem in the code and suggest a fix.",
}
ROUTES = ["chat", "reasoning"]
# The two tiers differ in size, so the large one is slower and, in the policy, dearer.
TINY_MODELS = {"small": dict(layers=2, hidden=128, seed=0), "large": dict(layers=4, hidden=256, seed=1)}
SUITES = Path(__file__).resolve().parents[2] / "deploy" / "local" / "suites.yaml"
STACK_START_TIMEOUT_S = 300  # a first run fits the classifier and distils the static embedder first (about a minute)
WARMUP_TIMEOUT_S = 600


def _step(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def demo(settings: Settings, *, requests: int, concurrency: int) -> int:
    started = time.monotonic()
    for name, shape in TINY_MODELS.items():
        path = settings.models_dir / name
        if not tiny_model.exists(path):
            _step(f"generating tiny model {name!r} at {path}")
            tiny_model.generate(path, **shape)
    if read_state(settings):
        raise DependencyUnavailable(f"a stack is already running on {settings.data_dir}; stop it first")

    log_path = settings.data_dir / "logs" / "demo-stack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _step(f"starting the local stack (`switchyard up`), log in {log_path}")
    stack = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up"], stdout=open(log_path, "wb"),
                             stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    run_start = datetime.now(timezone.utc)
    try:
        state = _wait_for_stack(settings, stack)
        _step(f"registering the eval suites of {SUITES}: the evaluator scores a share of chat and faq answers")
        quality.apply(settings, SUITES)
        stats = asyncio.run(_load(state, requests, concurrency))
        stats["gateway"] = asyncio.run(_gateway(state))
        stats["batch"] = _batch(settings, state)
        stats["status"] = _status_page(state, stats["answered"])
    finally:
        _step("stopping the stack (router and workers drain, the sink flushes)")
        if stack.poll() is None:
            stack.send_signal(signal.SIGINT)
        try:
            stack.wait(180)
        except subprocess.TimeoutExpired:
            _kill_tree(stack.pid)
    _report(settings, state, stats, run_start, time.monotonic() - started)
    return 0


def _kill_tree(pid: int) -> None:
    """The stack's children run in sessions of their own: kill them too, not only the supervisor."""
    import psutil

    try:
        parent = psutil.Process(pid)
        for proc in parent.children(recursive=True) + [parent]:
            proc.kill()
    except psutil.NoSuchProcess:
        pass


def _wait_for_stack(settings: Settings, stack: subprocess.Popen) -> dict:
    deadline = time.monotonic() + STACK_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if stack.poll() is not None:
            raise DependencyUnavailable(f"the stack exited with code {stack.returncode}; see its log")
        state = read_state(settings)
        if state and state["pid"] == stack.pid:
            return state
        time.sleep(0.2)
    raise DependencyUnavailable(f"the stack did not come up within {STACK_START_TIMEOUT_S} s ({state_path(settings)})")


FAQ = [  # questions customers ask again and again, some in other words: the faq route caches them
    "How do I return an item I bought online?",
    "how can I send back something I ordered online?",
    "What are your opening hours on Sunday?",
    "When do you open on Sundays?",
    "How long does delivery take?",
]


def _workload(rng: random.Random, requests: int) -> list[tuple[str, str, str, str]]:
    """(tenant, route, prompt, label): labeled prompts written for the router's evaluation (about
    70% simple, 30% hard) on the tiered chat route, and a sixth of repeated questions on faq."""
    from services.router.classify import HARD, read_labeled
    from services.router.train import BUNDLED_EVAL

    labeled = read_labeled(BUNDLED_EVAL)
    prompts = [(r.prompt, label) for r, label in labeled if r.prompt is not None]
    plan = []
    for i in range(requests):
        tenant = rng.choice(list(TENANTS))
        if i % 6 == 5:
            plan.append((tenant, "faq", rng.choice(FAQ), "simple"))
        else:
            prompt, label = rng.choice(prompts)
            plan.append((tenant, "chat", prompt, "hard" if label == HARD else "simple"))
    return plan


async def _load(state: dict, requests: int, concurrency: int) -> dict:
    topics = Topics(state["topic_prefix"])
    async with Client(state["bootstrap"], reply_to="demo", topics=topics) as client:
        _step("waiting for the workers' engines (vLLM on CPU takes one to four minutes to start)")
        warm = time.monotonic()
        await asyncio.gather(*(
            client.complete(tenant="warmup", route=route, messages=[{"role": "user", "content": "hello"}],
                            max_tokens=4, timeout_s=WARMUP_TIMEOUT_S)
            for route in ROUTES
        ))
        streamed = await _stream_one(client)
        _step(f"engines answering after {time.monotonic() - warm:.0f} s; "
              f"sending {requests} requests for {len(TENANTS)} tenants over routes chat and faq")
        rng = random.Random(7)
        plan = _workload(rng, requests)
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []

        async def one(tenant: str, route: str, prompt: str):
            async with gate:
                sent = time.monotonic()
                result = await client.complete(tenant=tenant, route=route, max_tokens=64, timeout_s=120,
                                               messages=[{"role": "system", "content": TENANTS[tenant]},
                                                         {"role": "user", "content": prompt}])
                latencies.append((time.monotonic() - sent) * 1000)
                return result

        load_start = time.monotonic()
        results = await asyncio.gather(*(one(t, r, p) for t, r, p, _ in plan))
        wall_s = time.monotonic() - load_start
    by_status: dict[str, int] = {}
    for r in results:
        by_status[r.status.value] = by_status.get(r.status.value, 0) + 1
    latencies.sort()
    labels = [label for *_, label in plan]
    hard = [r for r, label in zip(results, labels) if label == "hard"]
    return {
        "streamed": streamed,
        "sent": requests,
        "answered": len(results),
        "by_status": by_status,
        "ok_tokens_out": sum(r.tokens_out for r in results if r.status == Status.ok),
        "wall_s": wall_s,
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))],
        "by_tier": _count(r.tier or "-" for r in results if r.cache_hit.value == "none"),
        "by_cache": _count(r.cache_hit.value for r in results),
        "hard": len(hard),
        "hard_to_large": sum(1 for r in hard if r.model == "large" or r.tier == "large"),
        # What the same answers would have cost with every request run on the large model.
        "tokens": [(r.tokens_in, r.tokens_out) for r in results if r.status == Status.ok],
    }


async def _stream_one(client: Client) -> dict:
    """One streamed request (booked under the warm-up tenant): when its first text came, and its whole answer."""
    sent = time.monotonic()
    first_ms, pieces, result = None, 0, None
    async for piece in client.stream(tenant="warmup", route="chat", max_tokens=48,
                                     messages=[{"role": "user", "content": "Tell me about the sea."}]):
        if isinstance(piece, StreamDelta):
            pieces += 1
            first_ms = first_ms if first_ms is not None else (time.monotonic() - sent) * 1000
        else:
            result = piece
    return {"pieces": pieces, "first_ms": first_ms, "total_ms": (time.monotonic() - sent) * 1000,
            "model": result.model if result else None, "tokens_out": result.tokens_out if result else 0}


async def _gateway(state: dict) -> dict:
    """Two requests through the OpenAI-compatible gateway, as a service that cannot speak Kafka sends them."""
    import openai

    _step(f"calling the gateway at {state['gateway_url']} with the official openai client")
    client = openai.AsyncOpenAI(base_url=state["gateway_url"], api_key=LOCAL_GATEWAY_KEY, max_retries=0, timeout=120)
    sent = time.monotonic()
    plain = await client.chat.completions.create(
        model="chat", max_tokens=32, messages=[{"role": "user", "content": "What are your opening hours?"}])
    plain_ms = (time.monotonic() - sent) * 1000
    sent, first_ms, chunks = time.monotonic(), None, 0
    async for chunk in await client.chat.completions.create(
            model="chat", max_tokens=48, stream=True, messages=[{"role": "user", "content": "Tell me a story."}]):
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            first_ms = first_ms if first_ms is not None else (time.monotonic() - sent) * 1000
    return {"model": plain.model, "plain_ms": plain_ms, "tokens_out": plain.usage.completion_tokens,
            "chunks": chunks, "first_ms": first_ms}


def _batch(settings: Settings, state: dict, lines: int = 40) -> dict:
    """A small batch job through `switchyard batch submit`, as a user runs one."""
    path = settings.data_dir / "demo-batch.jsonl"
    run = int(time.time())  # a new job each demo: the same file would resume the last one
    path.write_text("".join(json.dumps({
        "custom_id": f"doc-{run}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"max_tokens": 24, "messages": [{"role": "user", "content": f"Summarise document {i} in a line."}]},
    }) + "\n" for i in range(lines)))
    _step(f"running a batch job of {lines} lines: switchyard batch submit {path} --route chat --tenant batch-demo")
    env = dict(os.environ, SWITCHYARD_BOOTSTRAP=state["bootstrap"], SWITCHYARD_TOPIC_PREFIX=state["topic_prefix"])
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "batch", "submit", str(path), "--route", "chat",
                           "--tenant", "batch-demo", "--rate", "100", "--timeout", "300"],
                          env=env, capture_output=True, text=True)
    summary = [line for line in done.stderr.splitlines() if "lines answered" in line]
    job = next((w.rstrip(":") for w in done.stderr.split() if w.startswith("batch_")), None)
    return {"lines": lines, "code": done.returncode, "seconds": time.monotonic() - started, "job": job,
            "summary": summary[-1] if summary else done.stderr.strip()[-500:]}


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _status_page(state: dict, answered: int, timeout_s: float = 20.0) -> dict | None:
    """The status page's figures once the sink has booked what was answered (from the metrics)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    figures = None
    while time.monotonic() < deadline:
        try:
            figures = httpx.get(state["status_url"] + "api/status", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            figures = None
        if figures and figures.get("ready") and figures["cache"]["answered"] >= answered:
            break
        time.sleep(1)
    return figures


def _report(settings: Settings, state: dict, stats: dict, since: datetime, elapsed_s: float) -> None:
    from services.sink.store import CostStore

    store = CostStore.connect(state["clickhouse_dsn"])
    try:
        rows = store.query(
            """
            SELECT tenant, route, model, count() AS requests, sum(tokens_in) AS tokens_in,
                   sum(tokens_out) AS tokens_out, sum(cost_nano_usd) AS cost_nano_usd,
                   quantile(0.5)(latency_ms) AS p50_ms, quantile(0.95)(latency_ms) AS p95_ms
            FROM switchyard.cost_records FINAL
            WHERE ts >= {since:DateTime64(3, 'UTC')} AND tenant != 'warmup'
            GROUP BY tenant, route, model ORDER BY tenant, route, model
            """,
            {"since": since},
        )
        scored = quality_report.scores(store, ["route", "model"], since=since)
    finally:
        store.close()
    header = f"{'tenant':<10} {'route':<10} {'model':<6} {'requests':>8} {'tokens in':>10} {'tokens out':>10} " \
             f"{'cents':>9} {'p50 ms':>8} {'p95 ms':>8}"
    print()
    print("Cost by tenant, route and model, read back from ClickHouse (switchyard.cost_records):")
    print(header)
    print("-" * len(header))
    total = {"requests": 0, "tokens_in": 0, "tokens_out": 0, "cost_nano_usd": 0}
    workload = {"requests": 0, "cost_nano_usd": 0}  # the three tenants' load, without the gateway and batch calls
    for row in rows:
        for key in total:
            total[key] += int(row[key])
        if row["tenant"] in TENANTS:
            for key in workload:
                workload[key] += int(row[key])
        print(f"{row['tenant']:<10} {row['route']:<10} {row['model']:<6} {row['requests']:>8} {row['tokens_in']:>10} "
              f"{row['tokens_out']:>10} {row['cost_nano_usd'] / 1e7:>9.4f} {row['p50_ms']:>8.0f} {row['p95_ms']:>8.0f}")
    print("-" * len(header))
    print(f"{'total':<28} {total['requests']:>8} {total['tokens_in']:>10} {total['tokens_out']:>10} "
          f"{total['cost_nano_usd'] / 1e7:>9.4f}")
    print()
    print(f"Requests sent {stats['sent']}, answered {stats['answered']} {json.dumps(stats['by_status'])}; "
          f"cost records booked {workload['requests']}.")
    print(f"End to end (client send to result): p50 {stats['p50_ms']:.0f} ms, p95 {stats['p95_ms']:.0f} ms; "
          f"{stats['answered'] / stats['wall_s']:.1f} requests/s, "
          f"{stats['ok_tokens_out'] / stats['wall_s']:.0f} output tokens/s over {stats['wall_s']:.1f} s.")
    from services.router.policy import load

    large = load(settings.policy_file).models["large"].price
    all_large = sum(large.cost_nano_usd(i, o) for i, o in stats["tokens"])
    saved = 1 - workload["cost_nano_usd"] / all_large if all_large else 0.0
    print(f"Routing: models chosen {json.dumps(stats['by_tier'])}; answered from memory "
          f"{json.dumps({k: v for k, v in stats['by_cache'].items() if k != 'none'})}; "
          f"{stats['hard_to_large']} of {stats['hard']} requests labeled hard reached the large model.")
    print(f"Cost {workload['cost_nano_usd'] / 1e7:.4f} cents against {all_large / 1e7:.4f} cents with every request "
          f"on the large model: {saved:.0%} saved.")
    streamed = stats["streamed"]
    if streamed["first_ms"] is not None:
        print(f"Streaming: a request on chat came back in {streamed['pieces']} pieces from {streamed['model']}, "
              f"the first after {streamed['first_ms']:.0f} ms, all {streamed['tokens_out']} tokens after "
              f"{streamed['total_ms']:.0f} ms.")
    gateway = stats["gateway"]
    print(f"Gateway (OpenAI API at {state['gateway_url']}, tenant local): a chat completion from {gateway['model']} "
          f"in {gateway['plain_ms']:.0f} ms ({gateway['tokens_out']} tokens); a streamed one in {gateway['chunks']} "
          f"chunks, the first after {gateway['first_ms'] or 0:.0f} ms.")
    batch = stats["batch"]
    print(f"Batch job {batch['job']} (tenant batch-demo, batch priority): {batch['summary'].split(': ', 1)[-1]}; "
          f"{batch['seconds']:.1f} s; `switchyard batch status {batch['job']}` reports it from any machine.")
    status = stats.get("status")
    if status and status.get("ready"):
        metered = {t["tenant"]: t["usd"] for t in status["cost_by_tenant"] if t["tenant"] != "warmup"}
        print(f"Status page {state['status_url']} (live while the stack ran, from the services' metrics): "
              f"{status['cache']['answered']} answers booked, latency p95 {status['latency_ms']['p95']} ms, "
              f"spend by tenant in USD {json.dumps({k: round(v, 6) for k, v in sorted(metered.items())})}.")
    if scored:
        print("Quality (sampled answers scored against deploy/local/suites.yaml, checks of form only): "
              + "; ".join(f"{r['route']} on {r['model']}: {r['samples']} scored, mean score {r['mean_score']}, "
                          f"pass rate {r['pass_rate']}" for r in scored)
              + ". `switchyard quality` shows scores and drift.")
    print(f"Demo took {elapsed_s:.0f} s in all.")
    print()
    print("Where the data lives:")
    print(f"  cost records   {masked(state['clickhouse_dsn'])}  "
          "(table switchyard.cost_records, view switchyard.cost_by_hour)")
    print(f"  models         {settings.models_dir}")
    print(f"  stack log      {settings.data_dir / 'logs' / 'demo-stack.log'}")
    broker = "the embedded Tansu broker (memory only, gone with the stack)" if not settings.bootstrap \
        else f"the Kafka cluster at {state['bootstrap']}"
    print(f"  topics         {state['topic_prefix']}.* on {broker}")
