"""Worker benchmark: the real vLLM engine (CPU, a tiny generated model) behind the real worker,
router, broker and Redis, on this machine. Three scenarios, each with the issue's target:

  efficiency  N chat requests (max_tokens 64, temperature 0) at C in flight, driven into the engine
              directly (Engine.run under a semaphore), then the same requests through the whole
              Kafka path (client -> requests topic -> router -> model topic -> worker -> reply topic)
              with the client keeping C in flight. Output tokens/s of the Kafka path over direct:
              target >= 0.90. One engine serves both; each run's requests differ from the other
              runs' only in a tag at the start of the system prompt, so no run finds another's KV blocks.
  batching    through the same path, every request sent at once to a worker with max_in_flight=1
              (one at a time), then to one with max_in_flight=64 (the engine's max_num_seqs).
              Output tokens/s of 64 over 1: target >= 3.4x.
  affinity    two workers, each with its own engine, in the model's consumer group (three partitions
              each). K conversations, each with its own system prompt of ~350 tokens, T turns; each
              round sends the next turn of every conversation at once (system + the conversation so
              far, with the model's own answers, + a new user turn). Variants, each on fresh
              conversations: 'prefix' (the router's prefix-keyed routing, as it runs), 'spread'
              (the issue's round-robin: every request with a random prefix_key of its own, so each
              lands on a random partition, whatever its conversation) and 'session' (the normal path
              with an explicit prefix_key per conversation; for comparison, no target). Mean engine
              TTFT (result.latency.ttft_ms) over turns >= 2: 'prefix' target >= 41% lower than
              'spread'. Also the prefix-cache hit share (sum cached_tokens / sum tokens_in) and how
              often a turn ran on the worker that ran the conversation's previous turn.
              Then the bound: engine A driven directly with half the conversations, once with every
              turn finding its conversation's KV blocks ('engine alone, warm') and once with none
              finding any ('engine alone, cold'): how much of TTFT prefix reuse can save on this
              model at all, whatever the placement (no target; spread itself hits about half).

The router runs in its own process (`switchyard router`), as deployed; the client and the workers
share this process's event loop; the engines' cores run in their own processes; broker and
redis-server are local processes too: all on the same cores.
Prints a table and writes JSON (bench-results/worker.json by default).

    scripts/bench_worker                    # all three scenarios, 3 runs each (~4-5 min on 2 cores)
    scripts/bench_worker --quick            # one smaller run of each (~3 min)
    scripts/bench_worker --scenarios affinity --runs 3
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchlib  # noqa: E402

import argparse  # noqa: E402
import asyncio  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

log = logging.getLogger("bench")

MODEL = "small"
ROUTE = "bench"
REPLY_TO = "bench"
POLICY = f"""
version: bench-worker-1
models:
  {MODEL}: {{tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.60, max_context_tokens: 2048}}
routes:
  {ROUTE}: {{models: [{MODEL}], max_output_tokens: 1024}}
# Limits high enough never to refuse, set so that every request runs the limiter's Lua in Redis.
default_tenant_limits: {{requests_per_minute: 1000000000, tokens_per_minute: 1000000000000}}
"""
TARGET_EFFICIENCY = 0.90  # Kafka-path tokens/s over direct
TARGET_BATCHING = 3.4  # tokens/s at max_in_flight=64 over max_in_flight=1
TARGET_TTFT_REDUCTION = 0.41  # prefix-keyed mean TTFT below spread's (round-robin's), turns >= 2
WARMUP_REQUESTS = 4
SYSTEM_PROMPT_TOKENS = 350
LABELED = [ROOT / "services" / "router" / "data" / "labeled_train.jsonl",
           ROOT / "services" / "router" / "data" / "labeled_eval.jsonl"]


@dataclass
class Settings:
    runs: int
    requests: int  # efficiency, and batching at max_in_flight=64
    concurrency: int
    max_tokens: int
    one_at_a_time_requests: int
    conversations: int
    turns: int
    turn_max_tokens: int


FULL = Settings(runs=3, requests=512, concurrency=32, max_tokens=64, one_at_a_time_requests=16,
                conversations=16, turns=4, turn_max_tokens=32)
QUICK = Settings(runs=1, requests=256, concurrency=32, max_tokens=64, one_at_a_time_requests=8,
                 conversations=16, turns=3, turn_max_tokens=32)
SCENARIOS = ("efficiency", "batching", "affinity")
VARIANTS = ("prefix", "spread", "session")
ENGINE_ALONE = ("warm", "cold")


# ---------------------------------------------------------------------------------------------
# Workload


def labeled_prompts() -> list[str]:
    """The router's labeled prompts (written for Switchyard), single-turn ones, each once."""
    seen: dict[str, None] = {}
    for path in LABELED:
        for line in path.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                if "prompt" in item:
                    seen.setdefault(item["prompt"])
    return list(seen)


class Workload:
    def __init__(self, tokenizer, seed: int = 7):
        self.prompts = labeled_prompts()
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self._users = itertools.count()

    def chat_requests(self, count: int, tag: str, tenant: str, max_tokens: int):
        """`count` requests, one labeled prompt each, under a short product system prompt that starts
        with `tag`: the same prompts in every run, but no KV blocks shared between runs."""
        system = (f"[{tag}] You are the support assistant of a software company. Answer the user's "
                  "question directly and briefly; say so when you do not know.")
        n = len(self.prompts)  # past the end, the prompts again, each marked with its round
        prompts = [self.prompts[i % n] + (f" ({i // n})" if i >= n else "") for i in range(count)]
        return [chat(tenant, [{"role": "system", "content": system}, {"role": "user", "content": p}], max_tokens)
                for p in prompts]

    def system_prompt(self, name: str) -> str:
        """A conversation's own system prompt of about SYSTEM_PROMPT_TOKENS tokens: house rules made
        of labeled prompts, in a random order."""
        lines = [f"You are {name}, the assistant of one product team. Follow the notes below, and keep "
                 "answers short. Notes from earlier tickets:"]
        while len(self.tokenizer.encode("\n".join(lines))) < SYSTEM_PROMPT_TOKENS:
            lines.append("- " + self.rng.choice(self.prompts))
        return "\n".join(lines)

    def user_turn(self) -> str:
        return self.prompts[next(self._users) % len(self.prompts)]


def chat(tenant: str, messages: list[dict], max_tokens: int, prefix_key: str | None = None):
    from schemas import InferenceRequest, Sampling

    return InferenceRequest(tenant=tenant, route=ROUTE, reply_to=REPLY_TO, messages=messages,
                            sampling=Sampling(max_tokens=max_tokens, temperature=0.0), prefix_key=prefix_key)


# ---------------------------------------------------------------------------------------------
# The parts


@dataclass
class Parts:
    bootstrap: str
    redis_url: str
    topics: object
    policies: object
    workload: Workload | None = None
    redis: object = None
    router: object = None
    client: object = None
    engines: list = field(default_factory=list)
    scenarios: list[str] = field(default_factory=list)
    served: dict[str, str] = field(default_factory=dict)  # request id -> the worker that ran it
    pids: dict[str, int] = field(default_factory=dict)  # broker, redis-server and router, by name


class Tagged:
    """The engine as a worker drives it, noting which worker ran each request (one dict write)."""

    def __init__(self, engine, name: str, served: dict[str, str]):
        self._engine, self.name, self._served = engine, name, served

    async def run(self, request, **kwargs):
        self._served[request.id] = self.name
        return await self._engine.run(request, **kwargs)

    def load(self):
        return self._engine.load()

    def shutdown(self) -> None:
        pass  # the benchmark shuts its engines down itself, once


def start_engine(model_path: Path, policies, label: str):
    from services.worker.engine import Engine, EngineConfig

    spec = policies.models[MODEL]
    started = time.perf_counter()
    # As services.worker.main builds it (max_num_seqs = the worker's max_in_flight, 64 by default).
    engine = Engine.start(EngineConfig(model_path=model_path, max_model_len=spec.max_context_tokens, max_num_seqs=64))
    seconds = time.perf_counter() - started
    say(f"engine {label} ready in {seconds:.1f} s")
    return engine, seconds


async def start_router(parts: Parts, policy_file: Path, logs: Path):
    """`switchyard router` in its own process, as it is deployed (no embedder: the route has one model)."""
    env = dict(os.environ, SWITCHYARD_BOOTSTRAP=parts.bootstrap, SWITCHYARD_REDIS_URL=parts.redis_url,
               SWITCHYARD_POLICY=str(policy_file), SWITCHYARD_TOPIC_PREFIX=parts.topics.prefix,
               SWITCHYARD_EMBEDDINGS="off", SWITCHYARD_CLASSIFIER=str(logs.parent / "no-classifier.json"),
               PYTHONUNBUFFERED="1")
    out = open(logs, "w")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "router"], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "router consuming" not in logs.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the router did not start:\n{logs.read_text()[-3000:]}")
        await asyncio.sleep(0.2)

    async def close():
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()

    return proc, close


@asynccontextmanager
async def serving(parts: Parts, backends: list, max_in_flight: int):
    """In-process workers in group worker.<model>, one per backend; yields once each owns partitions
    and one request has gone the whole way."""
    from services.worker.service import Worker

    workers = [Worker(model=MODEL, engine=b, bootstrap=parts.bootstrap, topics=parts.topics,
                      max_in_flight=max_in_flight, redis=parts.redis) for b in backends]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        await wait_assigned(workers, tasks)
        warm = parts.workload.chat_requests(WARMUP_REQUESTS, f"warm {uuid.uuid4().hex[:8]}",
                                            f"warm-{uuid.uuid4().hex[:8]}", 4)
        await through_kafka(parts, warm, None)
        yield workers
    finally:
        stop.set()
        for task in tasks:
            try:
                await task
            except Exception:  # noqa: BLE001 - reported, the run goes on to clean up
                log.exception("a worker failed")


async def wait_assigned(workers, tasks, timeout_s: float = 180) -> None:
    """Until every worker owns partitions and together they own all of the model topic's, once."""
    from shared.topics import MODEL_PARTITIONS

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for task in tasks:
            if task.done():
                raise RuntimeError(f"a worker stopped before it was assigned partitions: {task.exception()!r}")
        owned = [set(w._consumer.assignment()) if w._consumer is not None else set() for w in workers]  # noqa: SLF001
        if all(owned) and len(set().union(*owned)) == sum(map(len, owned)) == MODEL_PARTITIONS:
            say("partitions: " + "; ".join(f"worker {i + 1}: {sorted(tp.partition for tp in o)}"
                                           for i, o in enumerate(owned)))
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the workers were not assigned the model topic's partitions within {timeout_s:.0f} s")


# ---------------------------------------------------------------------------------------------
# Driving


async def direct(engine, requests: list, concurrency: int) -> dict:
    """Engine.run on each request, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    finished: list[float] = []
    latencies: list[float] = []

    async def one(request):
        async with gate:
            started = time.perf_counter()
            done = await engine.run(request, request_id=f"direct-{uuid.uuid4().hex}",
                                    max_tokens=request.sampling.max_tokens)
            finished.append(time.perf_counter())
            latencies.append(finished[-1] - started)
            return done

    started = time.perf_counter()
    done = await asyncio.gather(*(one(r) for r in requests))
    wall = max(finished) - started
    return {"requests": len(done), "failed": 0, "wall_s": round(wall, 3),
            "tokens_in": sum(d.tokens_in for d in done), "tokens_out": sum(d.tokens_out for d in done),
            "cached_tokens": sum(d.cached_tokens for d in done),
            "tok_s": round(sum(d.tokens_out for d in done) / wall, 1),
            "ttft_ms": summary([d.ttft_ms for d in done if d.ttft_ms is not None]),
            "latency_ms": summary([x * 1000 for x in latencies])}


async def through_kafka(parts: Parts, requests: list, concurrency: int | None) -> dict:
    """Each request through the client, `concurrency` at a time (None: all at once); stamped as sent."""
    from schemas import Status, now_ms

    gate = asyncio.Semaphore(concurrency or len(requests))
    finished: list[float] = []
    latencies: list[float] = []
    replies: list[int] = []

    async def one(request):
        async with gate:
            started = time.perf_counter()
            created_ms = now_ms()
            result = await parts.client.submit(request.model_copy(update={"created_at_ms": created_ms}))
            finished.append(time.perf_counter())
            latencies.append(finished[-1] - started)
            # From the worker's result (created + total) to the client having it: the way back.
            replies.append(now_ms() - created_ms - result.latency.total_ms)
            return result

    started = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests))
    wall = max(finished) - started
    ok = [r for r in results if r.status == Status.ok]
    if len(ok) < len(results):
        bad = next(r for r in results if r.status != Status.ok)
        raise RuntimeError(f"{len(results) - len(ok)} of {len(results)} requests did not succeed; first: "
                           f"{bad.status.value} {bad.error}")
    return {"requests": len(results), "failed": len(results) - len(ok), "wall_s": round(wall, 3),
            "tokens_in": sum(r.tokens_in for r in ok), "tokens_out": sum(r.tokens_out for r in ok),
            "cached_tokens": sum(r.cached_tokens for r in ok),
            "tok_s": round(sum(r.tokens_out for r in ok) / wall, 1),
            "ttft_ms": summary([r.latency.ttft_ms for r in ok if r.latency.ttft_ms is not None]),
            "queue_ms": summary([r.latency.queue_ms for r in ok]), "reply_ms": summary(replies),
            # From the worker's engine taking it to its result: what a slot is busy with per request.
            "run_ms": summary([r.latency.total_ms - r.latency.queue_ms for r in ok]),
            "latency_ms": summary([x * 1000 for x in latencies])}


async def conversations(parts: Parts, variant: str, settings: Settings) -> dict:
    """Fresh conversations, turn by turn, every conversation's next turn sent at once."""
    from schemas import Status, now_ms

    tag = uuid.uuid4().hex[:8]
    tenant = f"conv-{tag}"
    history = [[{"role": "system", "content": parts.workload.system_prompt(f"assistant {tag}-{c}")}]
               for c in range(settings.conversations)]
    turns: list[list] = []  # per turn, per conversation: the result
    ids: list[list[str]] = []
    started = time.perf_counter()
    for _ in range(settings.turns):
        requests = []
        for c in range(settings.conversations):
            history[c] = history[c] + [{"role": "user", "content": parts.workload.user_turn()}]
            key = {"session": f"{tag}-{c}", "spread": uuid.uuid4().hex}.get(variant)
            requests.append(chat(tenant, history[c], settings.turn_max_tokens, prefix_key=key))
        results = await asyncio.gather(*(parts.client.submit(r.model_copy(update={"created_at_ms": now_ms()}))
                                         for r in requests))
        bad = [r for r in results if r.status != Status.ok]
        if bad:
            raise RuntimeError(f"{len(bad)} turns did not succeed; first: {bad[0].status.value} {bad[0].error}")
        for c, result in enumerate(results):
            history[c] = history[c] + [{"role": "assistant", "content": result.output}]
        turns.append(results)
        ids.append([r.id for r in requests])
    wall = time.perf_counter() - started
    later = [r for results in turns[1:] for r in results]
    workers = [[parts.served.get(i) for i in row] for row in ids]
    same = [workers[t][c] == workers[t - 1][c] for t in range(1, len(ids)) for c in range(settings.conversations)]
    per_worker = dict(sorted(Counter(x for row in workers for x in row if x).items()))
    return {"conversations": settings.conversations, "turns": settings.turns, "requests": sum(map(len, turns)),
            "wall_s": round(wall, 3),
            "tokens_in_later_turns": sum(r.tokens_in for r in later),
            "cached_tokens_later_turns": sum(r.cached_tokens for r in later),
            "hit_share": hit_share(later), "hit_share_turn1": hit_share(turns[0]),
            "ttft_ms": ttft(later), "ttft_ms_turn1": ttft(turns[0]),
            "ttft_ms_by_turn": [ttft(results)["mean"] for results in turns],
            "queue_ms": summary([r.latency.queue_ms for r in later]),
            "e2e_ms_later_turns": summary([r.latency.total_ms for r in later]),
            "same_worker_share": round(sum(same) / len(same), 3) if same else None,
            "requests_per_worker": per_worker,
            "prompt_tokens_by_turn": [round(statistics.fmean(r.tokens_in for r in results)) for results in turns]}


# ---------------------------------------------------------------------------------------------
# Scenarios


async def efficiency(parts: Parts, settings: Settings, records: list[dict]) -> None:
    engine = parts.engines[0]
    n, c = settings.requests, settings.concurrency

    def requests(mode: str):
        tag = uuid.uuid4().hex[:8]
        return parts.workload.chat_requests(n, f"{mode} {tag}", f"eff-{tag}", settings.max_tokens)

    # Run 1 drives the engine directly before any worker has it; later runs alternate with the
    # Kafka path while the worker (and the router) sit idle.
    await measure(parts, records, "efficiency", "direct", 1, lambda: direct(engine, requests("direct"), c))
    async with serving(parts, [engine], 64):
        for run in range(1, settings.runs + 1):
            if run > 1:
                await measure(parts, records, "efficiency", "direct", run, lambda: direct(engine, requests("direct"), c))
            await measure(parts, records, "efficiency", "kafka path", run, lambda: through_kafka(parts, requests("kafka"), c))
        # The batching scenario's max_in_flight=64 runs, on this same worker.
        if "batching" in parts.scenarios:
            await batching_runs(parts, settings, records, 64)


async def batching(parts: Parts, settings: Settings, records: list[dict]) -> None:
    engine = parts.engines[0]
    # With the efficiency scenario, the max_in_flight=64 runs were made on its worker.
    if "efficiency" not in parts.scenarios:
        async with serving(parts, [engine], 64):
            await batching_runs(parts, settings, records, 64)
    async with serving(parts, [engine], 1):
        await batching_runs(parts, settings, records, 1)


async def batching_runs(parts: Parts, settings: Settings, records: list[dict], max_in_flight: int) -> None:
    n = settings.requests if max_in_flight > 1 else settings.one_at_a_time_requests
    for run in range(1, settings.runs + 1):
        tag = uuid.uuid4().hex[:8]
        requests = parts.workload.chat_requests(n, f"batch {tag}", f"batch-{tag}", settings.max_tokens)
        await measure(parts, records, "batching", f"max_in_flight={max_in_flight}", run,
                      lambda: through_kafka(parts, requests, None))


async def affinity(parts: Parts, settings: Settings, records: list[dict]) -> None:
    backends = [Tagged(engine, f"w{i + 1}", parts.served) for i, engine in enumerate(parts.engines[:2])]
    async with serving(parts, backends, 64):
        for run in range(1, settings.runs + 1):
            # Each run starts with another variant, so none is always the first after a quiet spell.
            for variant in VARIANTS[(run - 1) % 3:] + VARIANTS[:(run - 1) % 3]:
                await measure(parts, records, "affinity", variant, run, lambda: conversations(parts, variant, settings))
            for variant in ENGINE_ALONE[(run - 1) % 2:] + ENGINE_ALONE[:(run - 1) % 2]:
                await measure(parts, records, "affinity", f"engine alone, {variant}", run,
                              lambda: engine_alone(parts, variant, settings))


async def engine_alone(parts: Parts, variant: str, settings: Settings) -> dict:
    """What prefix reuse can save on this model at all, without Kafka, router or placement: engine A
    driven directly with half the conversations (what each of two workers has), turn by turn as in
    `conversations`, every conversation's next turn at once. 'warm': a conversation's prompt starts
    the same at every turn, so each turn finds the KV blocks of the one before (affinity at its best);
    'cold': the same prompts behind a tag new at every turn, so no turn finds any (none at all)."""
    engine = parts.engines[0]
    tag = uuid.uuid4().hex[:8]
    n = max(1, settings.conversations // 2)
    systems = [parts.workload.system_prompt(f"assistant {tag}-{c}") for c in range(n)]
    history: list[list[dict]] = [[] for _ in range(n)]
    turns = []
    started = time.perf_counter()
    for turn in range(settings.turns):
        requests = []
        head = f"[{tag} {turn}] " if variant == "cold" else f"[{tag}] "
        for c in range(n):
            history[c].append({"role": "user", "content": parts.workload.user_turn()})
            requests.append(chat(f"alone-{tag}", [{"role": "system", "content": head + systems[c]}, *history[c]],
                                 settings.turn_max_tokens))
        done = await asyncio.gather(*(engine.run(r, request_id=f"alone-{uuid.uuid4().hex}",
                                                 max_tokens=r.sampling.max_tokens) for r in requests))
        for c, d in enumerate(done):
            history[c].append({"role": "assistant", "content": d.text})
        turns.append(done)
    later = [d for done in turns[1:] for d in done]
    return {"conversations": n, "turns": settings.turns, "requests": sum(map(len, turns)),
            "wall_s": round(time.perf_counter() - started, 3),
            "hit_share": hit_share(later),
            "ttft_ms": summary([d.ttft_ms for d in later if d.ttft_ms is not None]),
            "ttft_ms_turn1": summary([d.ttft_ms for d in turns[0] if d.ttft_ms is not None]),
            "same_worker_share": None}


async def measure(parts: Parts, records: list[dict], scenario: str, variant: str, run: int, body) -> None:
    what = f"{scenario} {variant} run {run}"
    record = {"scenario": scenario, "variant": variant, "run": run,
              "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        before = cpu_by_part(parts)
        record.update(await body())
        after = cpu_by_part(parts)
        record["cpu_s"] = {part: round(after[part] - before[part], 2) for part in after}
    except Exception as exc:  # noqa: BLE001 - one failed run is reported, the rest go on
        log.exception("%s failed", what)
        record["error"] = repr(exc)
        say(f"{what}: FAILED {exc!r}")
    else:
        extra = (f"TTFT mean {record['ttft_ms'].get('mean')} ms, hit share {record['hit_share']}, same worker "
                 f"{record['same_worker_share']}" if scenario == "affinity"
                 else f"{record['tokens_out']} tokens out = {record['tok_s']} tok/s")
        say(f"{what}: {record['requests']} requests in {record['wall_s']} s; {extra}")
    records.append(record)


def cpu_by_part(parts: Parts) -> dict[str, float]:
    """CPU seconds used so far by each part on this machine: the engines' core processes (every
    process this one started but the broker, redis-server and the router), this process (the
    client, the workers and the engines' front ends, which turn their output into text), the router,
    the broker and redis-server. Where the cores went in a run: on two cores, what the Kafka path
    uses is taken from the engine."""
    import psutil

    named = {pid: name for name, pid in parts.pids.items()}
    used = {"engine cores": 0.0, "this process": benchlib.cpu_seconds(os.getpid()) or 0.0,
            **{name: 0.0 for name in parts.pids}}
    for child in psutil.Process().children(recursive=True):
        used[named.get(child.pid, "engine cores")] += benchlib.cpu_seconds(child.pid) or 0.0
    return used


# ---------------------------------------------------------------------------------------------
# Reporting


def summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None}
    ordered = sorted(values)
    at = lambda q: round(float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]), 1)  # noqa: E731
    return {"count": len(values), "mean": round(statistics.fmean(values), 1), "p50": at(0.5), "p95": at(0.95),
            "max": round(float(ordered[-1]), 1)}


def hit_share(results: list) -> float:
    return round(sum(r.cached_tokens for r in results) / max(1, sum(r.tokens_in for r in results)), 3)


def ttft(results: list) -> dict:
    return summary([r.latency.ttft_ms for r in results if r.latency.ttft_ms is not None])


def pooled_tok_s(records: list[dict], scenario: str, variant: str) -> float | None:
    mine = [r for r in records if r["scenario"] == scenario and r["variant"] == variant and not r.get("error")]
    wall = sum(r["wall_s"] for r in mine)
    return round(sum(r["tokens_out"] for r in mine) / wall, 1) if wall else None


def pooled_ttft(records: list[dict], variant: str) -> float | None:
    mine = [r for r in records if r["scenario"] == "affinity" and r["variant"] == variant and not r.get("error")]
    count = sum(r["ttft_ms"]["count"] for r in mine)
    return round(sum(r["ttft_ms"]["mean"] * r["ttft_ms"]["count"] for r in mine if r["ttft_ms"]["count"]) / count,
                 1) if count else None


def targets(records: list[dict], scenarios: list[str]) -> list[dict]:
    out = []
    if "efficiency" in scenarios:
        kafka, base = pooled_tok_s(records, "efficiency", "kafka path"), pooled_tok_s(records, "efficiency", "direct")
        value = round(kafka / base, 3) if kafka and base else None
        # Run k of the Kafka path against direct run k, made just before it on the same engine.
        runs = {(r["variant"], r["run"]): r["tok_s"] for r in records
                if r["scenario"] == "efficiency" and not r.get("error")}
        per_run = [round(runs["kafka path", k] / runs["direct", k], 2) for variant, k in sorted(runs)
                   if variant == "kafka path" and ("direct", k) in runs]
        out.append({"scenario": "efficiency", "measure": "Kafka-path tok/s / direct tok/s",
                    "value": value, "per_run": per_run,
                    "shown": (f"{value:.2f}x ({kafka} / {base}); runs {', '.join(f'{x:.2f}' for x in per_run)}"
                              if value else "-"),
                    "target": f">= {TARGET_EFFICIENCY:.2f}x",
                    "met": value is not None and value >= TARGET_EFFICIENCY})
    if "batching" in scenarios:
        many, one = (pooled_tok_s(records, "batching", "max_in_flight=64"),
                     pooled_tok_s(records, "batching", "max_in_flight=1"))
        value = round(many / one, 2) if many and one else None
        out.append({"scenario": "batching", "measure": "tok/s at max_in_flight=64 / at 1",
                    "value": value, "shown": f"{value:.1f}x ({many} / {one})" if value else "-",
                    "target": f">= {TARGET_BATCHING}x", "met": value is not None and value >= TARGET_BATCHING})
    if "affinity" in scenarios:
        prefix, rr, session = pooled_ttft(records, "prefix"), pooled_ttft(records, "spread"), pooled_ttft(
            records, "session")
        value = round(1 - prefix / rr, 3) if prefix and rr else None
        out.append({"scenario": "affinity", "measure": "mean TTFT turns>=2, prefix-keyed vs spread (round-robin)",
                    "value": value,
                    "shown": f"{lower(value)} ({prefix} vs {rr} ms)" if value is not None else "-",
                    "target": f">= {TARGET_TTFT_REDUCTION:.0%} lower",
                    "met": value is not None and value >= TARGET_TTFT_REDUCTION})
        value = round(1 - session / rr, 3) if session and rr else None
        out.append({"scenario": "affinity", "measure": "(for comparison) session key vs spread",
                    "value": value,
                    "shown": f"{lower(value)} ({session} vs {rr} ms)" if value is not None else "-",
                    "target": "no target", "met": None})
        warm, cold = pooled_ttft(records, "engine alone, warm"), pooled_ttft(records, "engine alone, cold")
        value = round(1 - warm / cold, 3) if warm and cold else None
        out.append({"scenario": "affinity", "measure": "(the bound) engine alone, every turn warm vs every turn cold",
                    "value": value,
                    "shown": f"{lower(value)} ({warm} vs {cold} ms)" if value is not None else "-",
                    "target": "no target", "met": None})
    return out


def lower(share: float) -> str:
    return f"{share:.0%} lower" if share >= 0 else f"{-share:.0%} higher"


def fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


columns = benchlib.columns


def table(records: list[dict]) -> str:
    head = ["scenario", "variant", "run", "requests", "wall s", "tok out", "tok/s", "TTFT ms", "queue ms",
            "reply ms", "hit share", "same worker", "engine cores", "other cores", "load"]
    rows = []
    for r in records:
        if r.get("error"):
            rows.append([r["scenario"], r["variant"], str(r["run"]), "ERROR", *["-"] * 10,
                         fmt(r["loadavg_before"][0], 2)])
            continue
        engine_s = r["cpu_s"]["engine cores"]
        other_s = sum(r["cpu_s"].values()) - engine_s
        affinity_run = r["scenario"] == "affinity"
        rows.append([r["scenario"], r["variant"], str(r["run"]), str(r["requests"]), fmt(r["wall_s"], 2),
                     "-" if affinity_run else str(r["tokens_out"]), "-" if affinity_run else fmt(r["tok_s"], 0),
                     fmt(r["ttft_ms"].get("mean"), 0), fmt(r.get("queue_ms", {}).get("mean"), 0),
                     fmt(r.get("reply_ms", {}).get("mean"), 0),
                     fmt(r["hit_share"] if affinity_run else r["cached_tokens"] / max(1, r["tokens_in"]), 2),
                     fmt(r.get("same_worker_share"), 2), fmt(engine_s / r["wall_s"], 2), fmt(other_s / r["wall_s"], 2),
                     fmt(r["loadavg_before"][0], 2)])
    return columns(head, rows)


def target_table(rows: list[dict]) -> str:
    return columns(["scenario", "measure", "measured", "target", "met?"],
                   [[t["scenario"], t["measure"], t["shown"], t["target"],
                     "-" if t["met"] is None else ("yes" if t["met"] else "NO")] for t in rows])


def machine() -> dict:
    return benchlib.machine("the engines' core processes, the Tansu broker and redis-server run on this same "
                            "machine, the router runs in its own process, and the client and workers share one")


say = benchlib.say


# ---------------------------------------------------------------------------------------------
# Running


async def bench(args, settings: Settings, scenarios: list[str], out: Path) -> int:
    from redis.asyncio import Redis
    from transformers import AutoTokenizer

    from services.router.policy import load
    from services.stack import infra
    from services.worker import tiny_model
    from shared.client import Client
    from shared.kafka import ensure_topics
    from shared.topics import Topics

    # SIGTERM ends the run as Ctrl-C does: the run is cancelled, and everything started is stopped.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    workdir = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    procs, closers = [], []
    records: list[dict] = []
    engine_start_s: list[float] = []
    started_at = datetime.now(timezone.utc)
    parts = None
    try:
        broker = infra.start_broker(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(broker)
        redis_proc = infra.start_redis(workdir / "redis", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis_proc)
        say(f"broker {broker.address}, redis {redis_proc.address} (both on this machine)")
        policy_file = workdir / "policy.yaml"
        policy_file.write_text(POLICY)
        topics = Topics(f"benchw{uuid.uuid4().hex[:6]}")
        parts = Parts(bootstrap=broker.address, redis_url=redis_proc.address, topics=topics,
                      policies=load(policy_file), scenarios=scenarios)
        started = time.perf_counter()
        model_path = tiny_model.generate(workdir / "models" / MODEL, layers=args.layers, hidden=args.hidden)
        say(f"tiny model ({args.layers} layers, hidden {args.hidden}) generated in "
            f"{time.perf_counter() - started:.1f} s")
        parts.workload = Workload(AutoTokenizer.from_pretrained(str(model_path)))
        # Engines first, while nothing in this process talks to the broker (a consumer must not miss its
        # heartbeats). Two start side by side in threads: vLLM starts the output handler on first use.
        labels = ["A", "B"][:2 if "affinity" in scenarios else 1]
        started = await asyncio.gather(*(asyncio.to_thread(start_engine, model_path, parts.policies, label)
                                         for label in labels))
        for label, (engine, seconds) in zip(labels, started):
            parts.engines.append(engine)
            engine_start_s.append(round(seconds, 1))
            # A fresh engine's first requests, and its first full batch, are slow: kept out of every figure.
            warm = parts.workload.chat_requests(2 * settings.concurrency, f"warm {label}", "warm", 16)
            await direct(engine, warm, settings.concurrency)
        await ensure_topics(parts.bootstrap, topics.plan([MODEL]) + [topics.reply_spec(REPLY_TO)])
        parts.redis = Redis.from_url(parts.redis_url, socket_timeout=5, socket_connect_timeout=2)
        parts.router, close_router = await start_router(parts, policy_file, workdir / "router.log")
        parts.pids = {"broker": broker.proc.pid, "redis-server": redis_proc.proc.pid, "router": parts.router.pid}
        closers.append(close_router)
        parts.client = Client(parts.bootstrap, reply_to=REPLY_TO, topics=topics, timeout_s=300)
        await parts.client.start()
        closers.append(parts.client.close)
        info = machine()
        say(f"machine: {info['cpu']}, {info['cores']} cores; load average {os.getloadavg()[0]:.2f}")
        for scenario in scenarios:
            say(f"scenario {scenario}")
            await {"efficiency": efficiency, "batching": batching, "affinity": affinity}[scenario](
                parts, settings, records)
    finally:
        for close in reversed(closers):
            try:
                await close()
            except Exception:  # noqa: BLE001
                log.exception("stopping a part failed")
        if parts is not None:
            if parts.redis is not None:
                await parts.redis.aclose()
            for engine in parts.engines:
                engine.shutdown()
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    goals = targets(records, scenarios)
    info = machine()
    print()
    print(table(records))
    print()
    print(target_table(goals))
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, Python {info['python']}; {info['note']}.")
    print(f"tiny model: {args.layers} layers, hidden {args.hidden}, random weights; engines started in "
          f"{engine_start_s} s. load average at end {[round(x, 2) for x in os.getloadavg()]} "
          "(column 'load': 1-min average before each run)")
    print(f"efficiency: {settings.requests} chat requests (labeled prompts), max_tokens {settings.max_tokens}, "
          f"temperature 0, {settings.concurrency} in flight; tok/s = output tokens / (first send to last result). "
          f"batching: all sent at once; {settings.one_at_a_time_requests} requests at max_in_flight=1, "
          f"{settings.requests} at 64. affinity: {settings.conversations} conversations x {settings.turns} turns, "
          f"~{SYSTEM_PROMPT_TOKENS}-token system prompts, max_tokens {settings.turn_max_tokens}; TTFT = engine's "
          "(result.latency.ttft_ms), turns >= 2; hit share = cached / prompt tokens, turns >= 2; same worker = "
          "share of turns run by the worker that ran the conversation's previous turn. queue ms = created -> "
          "the worker's engine taking it. engine cores = CPU seconds of the engines' core processes / wall s; "
          "other cores = the same for this process (client, workers, engine front ends), router, broker and "
          "redis-server (JSON: cpu_s, by part).")
    doc = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "machine": info,
        "config": {"scenarios": scenarios, "quick": args.quick, **settings.__dict__,
                   "model": {"layers": args.layers, "hidden": args.hidden, "weights": "random (tiny_model.generate)"},
                   "engine": {"max_num_seqs": 64, "max_model_len": parts.policies.models[MODEL].max_context_tokens
                              if parts else None, "kv_cache_gib": 1, "prefix_caching": True},
                   "engine_start_s": engine_start_s, "system_prompt_tokens": SYSTEM_PROMPT_TOKENS,
                   "warmup": f"per engine, {2 * settings.concurrency} requests of 16 tokens at {settings.concurrency} "
                             f"in flight; per worker start, {WARMUP_REQUESTS} requests through the Kafka path",
                   "policy": POLICY, "event_loop": "uvloop (as services run)",
                   "prompts": "services/router/data/labeled_{train,eval}.jsonl single-turn prompts"},
        "targets": {"efficiency_ratio": TARGET_EFFICIENCY, "batching_ratio": TARGET_BATCHING,
                    "affinity_ttft_reduction": TARGET_TTFT_REDUCTION},
        "summary": goals,
        "runs": records,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str, allow_nan=False))
    print(f"\nwritten to {out}")
    return 1 if any(r.get("error") for r in records) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description="The worker on the real engine: Kafka-path efficiency, continuous "
                                                 "batching, prefix affinity.")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"one smaller run: {QUICK.requests} requests, {QUICK.one_at_a_time_requests} one at a "
                             f"time, {QUICK.conversations} conversations x {QUICK.turns} turns")
    parser.add_argument("--runs", type=int, help=f"runs of each variant (default {FULL.runs}; --quick {QUICK.runs})")
    parser.add_argument("--requests", type=int, help="requests per efficiency run and batching run at 64 in flight")
    parser.add_argument("--concurrency", type=int,
                        help=f"in flight in the efficiency scenario (default {FULL.concurrency})")
    parser.add_argument("--conversations", type=int, help="conversations per affinity variant")
    parser.add_argument("--turns", type=int, help="turns per conversation")
    parser.add_argument("--layers", type=int, default=2, help="of the tiny model (default 2, as the tests)")
    parser.add_argument("--hidden", type=int, default=128, help="of the tiny model, a multiple of 64 (default 128)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "worker.json")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    settings = QUICK if args.quick else FULL
    overrides = {k: v for k, v in dict(runs=args.runs, requests=args.requests, concurrency=args.concurrency,
                                       conversations=args.conversations, turns=args.turns).items() if v is not None}
    settings = Settings(**{**settings.__dict__, **overrides})
    if settings.turns < 2:
        parser.error("--turns must be at least 2: TTFT is measured on turns after the first")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    scenarios = [s for s in SCENARIOS if s in scenarios]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if args.verbose else "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvloop

    try:
        return uvloop.run(bench(args, settings, scenarios, args.out.resolve()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\n[bench] interrupted; engines, broker and Redis stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
