"""The faults, one a scenario: how each is injected, and what "recovered by itself" means for it.

Each `inject` returns when the fault is over (a killed process is over at once, since nobody
restarts it by hand; Redis and the broker once they are started again) with what it saw on the
way; `recovered` is polled from then on. Every scenario also checks the promises in checks.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import orjson

from services.chaos.load import REPLY_TO, Load
from services.chaos.rig import Rig
from services.stack.status import total


@dataclass
class Scenario:
    name: str
    what: str
    inject: Callable[[Rig, Load, "Drill"], Awaitable[dict]]
    recovered: Callable[[Rig, Load, float, dict], Awaitable[bool]]
    durable: bool = False  # runs on a rig whose broker outlives a restart (rig.py)
    recovery_timeout_s: float | None = None  # None: the drill's


@dataclass
class Drill:
    """Timings every scenario shares; the tests shorten none of the faults themselves."""

    lead_s: float = 4.0  # steady load before the fault
    tail_s: float = 6.0  # steady load after recovery
    redis_down_s: float = 30.0
    broker_down_s: float = 5.0
    durable_rate_per_s: float = 1.0  # the S3-backed broker's pace (rig.py)
    provider_fault_s: float = 10.0  # of 429s, then as long of stalls
    recovery_timeout_s: float = 240.0
    settle_s: float = 180.0


def answered_since(load: Load, since: float, model: str | None = None) -> bool:
    """A request the broker took after `since` has an ok answer from a model (from `model`, if named)."""
    for sent in load.sent.values():
        reply = load.final(sent.request.id) if sent.acked_at >= since else None
        if reply and reply.result.status.value == "ok" and reply.result.cache_hit.value == "none" \
                and reply.result.model is not None and (model is None or reply.result.model == model):
            return True
    return False


def _kill(service: str) -> Callable[[Rig, Load, Drill], Awaitable[dict]]:
    async def inject(rig: Rig, load: Load, drill: Drill) -> dict:
        return {"killed_pid": rig.kill(service), "killed_at": time.monotonic()}
    return inject


# A killed process still there after this long has its threads' states noted in the report.
LINGERING_S = 15.0


def _watch_exit(seen: dict) -> None:
    """Note how long the killed process took to go (`switchyard up` restarts a service only once it
    has reaped it) and, if it lingers, what its threads were doing: their state, kernel wait channel
    and kernel stack. Linux only; elsewhere it notes nothing."""
    if "exit_s" in seen:
        return
    pid, waited = seen["killed_pid"], time.monotonic() - seen["killed_at"]
    if not os.path.exists(f"/proc/{pid}"):
        seen["exit_s"] = round(waited, 1)
        return
    if waited > LINGERING_S and "lingering" not in seen:
        seen["lingering"] = {"after_s": round(waited, 1), "threads": _threads(pid)}


def _threads(pid: int) -> list[dict]:
    out = []
    try:
        tasks = sorted(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # gone meanwhile
        return out
    for task in tasks:
        try:
            head, _, rest = (task / "stat").read_text().rpartition(")")
            state = rest.split()[0]
            thread = {"name": head.partition("(")[2], "state": state, "wchan": (task / "wchan").read_text()}
            if state != "S":
                thread["stack"] = (task / "stack").read_text().split("\n")[:8]
            out.append(thread)
        except OSError:  # gone meanwhile, or a kernel stack we may not read
            continue
    return out


def _restarted(service: str, model: str | None = None) -> Callable[[Rig, Load, float, dict], Awaitable[bool]]:
    """Started again by `switchyard up` (a new pid serving metrics), and answering again."""
    async def recovered(rig: Rig, load: Load, since: float, seen: dict) -> bool:
        _watch_exit(seen)
        back = rig.pid(service) != seen["killed_pid"] and await rig.metrics(service) is not None
        return back and answered_since(load, since, model)
    return recovered


async def _sink_recovered(rig: Rig, load: Load, since: float, seen: dict) -> bool:
    _watch_exit(seen)
    if rig.pid("sink") == seen["killed_pid"]:
        return False
    samples = await rig.metrics("sink")
    # The new sink has booked what waited for it: records inserted, nothing left on its partitions.
    return (samples is not None and total(samples, "switchyard_sink_records_total", outcome="inserted") > 0
            and total(samples, "switchyard_consumer_lag_records", group="sink") == 0)


REDIS_PARTS = ("router", "worker.small")


async def _degraded(rig: Rig) -> dict[str, float]:
    out = {}
    for service in REDIS_PARTS:
        samples = await rig.metrics(service)
        if samples is not None:
            out.update({f"{service}/{part}": v for part, v in
                        total(samples, "switchyard_redis_degraded", by="part").items()})
    return out


async def _stop_redis(rig: Rig, load: Load, drill: Drill) -> dict:
    rig.stop_redis()
    down_at = time.monotonic()
    flagged: set[str] = set()
    while time.monotonic() - down_at < drill.redis_down_s:
        flagged |= {part for part, v in (await _degraded(rig)).items() if v == 1}
        await asyncio.sleep(1.0)
    rig.start_redis()
    return {"degraded_parts_seen": sorted(flagged)}


async def _redis_recovered(rig: Rig, load: Load, since: float, seen: dict) -> bool:
    parts = await _degraded(rig)
    return bool(parts) and all(v == 0 for v in parts.values()) and answered_since(load, since)


async def _restart_broker(rig: Rig, load: Load, drill: Drill) -> dict:
    port = rig.bootstrap
    rig.stop_broker()
    await asyncio.sleep(drill.broker_down_s)
    rig.start_broker()
    return {"broker": port}


async def _broker_recovered(rig: Rig, load: Load, since: float, seen: dict) -> bool:
    return all(answered_since(load, since, model) for model in rig.models)


async def _provider_faults(rig: Rig, load: Load, drill: Drill) -> dict:
    before = dict(rig.provider.calls)
    for mode in ("429", "stall"):
        rig.provider.mode = mode
        await asyncio.sleep(drill.provider_fault_s)
    rig.provider.mode = "ok"
    return {"provider_calls": {m: rig.provider.calls[m] - before[m] for m in ("429", "stall")}}


async def _provider_recovered(rig: Rig, load: Load, since: float, seen: dict) -> bool:
    return answered_since(load, since, "remote")


def poison_messages(run: str) -> tuple[list[bytes], list[str]]:
    """Bad messages of every kind the router must set aside; and the ids of those whose sender can
    be answered (they name a request id and a readable reply_to)."""
    addressed = {f"{run}-poison-{k}": body for k, body in enumerate([
        {"tenant": "acme", "route": "chat", "prompt": "x", "sampling": {"max_tokens": -5}},
        {"tenant": "acme", "route": "chat", "prompt": "x", "sampling": {"temperature": 1e9}},
        {"tenant": "acme", "route": "chat", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        {"tenant": "acme", "route": "chat", "prompt": 12345},
        {"tenant": "acme", "route": "chat", "prompt": "x", "unknown_field": {"deep": [1, 2, 3]}},
        {"tenant": "a b/c", "route": "chat", "prompt": "x"},
    ])}
    bodies = [orjson.dumps({"id": rid, "reply_to": REPLY_TO, "schema_version": 1, **body})
              for rid, body in addressed.items()]
    bodies += [b"\xff\xfe not json at all", b"", b"[]", b'{"id": 1}', b"null", b'{"tenant": "acme"',
               b'{"prompt": "' + b"A" * (1024 * 1024 + 10) + b'"}', b"[" * 5000 + b"]" * 5000,
               b'{"id": "x", "reply_to": "chaos", "created_at_ms": 1' + b"0" * 40 + b"}"]
    return bodies, list(addressed)


async def _poison(rig: Rig, load: Load, drill: Drill) -> dict:
    bodies, addressed = poison_messages(load.run)
    router_pid = rig.pid("router")
    start = time.monotonic()
    await load.poison(bodies)
    return {"poison_sent": len(bodies), "addressed": addressed, "router_pid": router_pid, "since": start}


async def _poison_recovered(rig: Rig, load: Load, since: float, seen: dict) -> bool:
    dead = [d for at, d in load.dead_letters if at >= seen["since"]]
    answered = all(load.final(rid) is not None for rid in seen["addressed"])
    return len(dead) >= seen["poison_sent"] and answered and answered_since(load, since)


SCENARIOS = {s.name: s for s in [
    Scenario("worker-kill", "kill -9 the small model's worker (its vLLM engine too)", _kill("worker.small"),
             _restarted("worker.small", "small")),
    Scenario("router-kill", "kill -9 the router", _kill("router"), _restarted("router")),
    # A SIGKILLed sink has taken minutes to go in some runs (docs/chaos.md): its report then says
    # what its threads were doing, and the drill waits for it longer than for the others.
    Scenario("sink-kill", "kill -9 the cost sink", _kill("sink"), _sink_recovered, recovery_timeout_s=600.0),
    Scenario("redis-stop", "Redis stopped, then started again", _stop_redis, _redis_recovered),
    Scenario("provider-faults", "the provider API answers 429, then stalls past the timeout", _provider_faults,
             _provider_recovered),
    Scenario("poison-burst", "a burst of malformed, invalid and oversized messages", _poison, _poison_recovered),
    # Last, as it runs: on a rig of its own (see rig.py).
    Scenario("broker-restart", "the broker stopped, then started again", _restart_broker, _broker_recovered,
             durable=True),
]}
