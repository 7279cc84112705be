"""`switchyard chaos`: run the drills one after another on one stack, print the table, write JSON."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path

from services.chaos import checks
from services.chaos.load import Load
from services.chaos.rig import TOPIC_PREFIX, Rig
from services.chaos.scenarios import SCENARIOS, Drill, Scenario, answered_since
from services.router.policy import load as load_policy
from services.sink.store import CostStore
from shared.errors import ConfigError, DependencyUnavailable
from shared.topics import Topics

WARMUP_TIMEOUT_S = 600
STEADY = Scenario("steady", "no fault: the baseline", lambda rig, load, drill: _nothing(),
                  lambda rig, load, since, seen: _answered(load, since))
ORDER = ["steady", *SCENARIOS]
COLUMNS = ["scenario", "sent", "answered", "lost", "errors", "dup replies", "double-billed", "unbilled",
           "books = results", "recovery s", "promises"]


async def _nothing() -> dict:
    return {}


async def _answered(load: Load, since: float) -> bool:
    return answered_since(load, since)


def _say(message: str) -> None:
    print(f"[chaos] {message}", flush=True)


def pick(names: str) -> list[Scenario]:
    every = {"steady": STEADY, **SCENARIOS}
    wanted = ORDER if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in every]
    if unknown or not wanted:
        raise ConfigError(f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ORDER)} or all")
    return [every[n] for n in wanted]


def _interrupted(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(data_dir: Path, scenarios: str, rate_per_s: float, drill: Drill, out: Path) -> int:
    chosen = pick(scenarios)
    # Killed with SIGTERM (a CI timeout, say), the drill still stops every process it started.
    signal.signal(signal.SIGTERM, _interrupted)
    run = uuid.uuid4().hex[:8]
    started = time.monotonic()
    rows, judged = [], []
    # The drills that need a broker outliving its restart run last, on a rig of their own.
    for durable in (False, True):
        group = [s for s in chosen if s.durable == durable]
        if not group:
            continue
        rig = Rig(data_dir, durable=durable)
        _say(f"drill {run}: starting a stack in {data_dir}" + (" on a broker storing in S3" if durable else "")
             + f" (log {rig.logs / 'stack.log'})")
        rate = drill.durable_rate_per_s if durable else rate_per_s
        try:
            rig.start()
            policies = load_policy(data_dir / "policy.yaml")
            dsn = rig.clickhouse_dsn
            found, load = asyncio.run(_drills(rig, run, group, rate, drill))
        except BaseException:
            print(rig.log_tail(), flush=True)
            raise
        finally:
            _say("stopping the stack (the workers drain, the sink books what is left)")
            rig.stop()
        rows += found
        judged.append((load, [r["scenario"] for r in found], policies))
    # Both rigs' sinks booked into the same chDB folder; one engine per process, so read it now.
    store = CostStore.connect(dsn)
    try:
        books = {}
        for load, names, policies in judged:
            books.update(checks.books(store, load, names, policies))
    finally:
        store.close()
    for row in rows:
        row.update(books[row["scenario"]])
        row["problems"] = checks.problems(row)
    print(table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run, "rate_per_s": rate_per_s, "drill": drill.__dict__, "machine": _machine(),
                               "wall_s": round(time.monotonic() - started, 1), "scenarios": rows}, indent=2) + "\n")
    failed = [r["scenario"] for r in rows if r["problems"]]
    _say(f"wrote {out}; " + (f"promises broken in: {', '.join(failed)}" if failed else "every promise held"))
    return 1 if failed else 0


async def _drills(rig: Rig, run: str, chosen: list[Scenario], rate_per_s: float, drill: Drill):
    load = Load(rig.bootstrap, Topics(TOPIC_PREFIX), run, rate_per_s, rig.fetch_wait_ms)
    await load.start()
    try:
        load.begin("warmup")
        _say("waiting for every model to answer (vLLM on CPU takes one to four minutes to start)")
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        while not all(answered_since(load, 0, model) for model in rig.models):
            if time.monotonic() > deadline:
                raise DependencyUnavailable(f"no answers from the stack within {WARMUP_TIMEOUT_S} s")
            await asyncio.sleep(0.5)
        load.pause()
        await load.settle("warmup", drill.settle_s)
        rows = [await _scenario(rig, load, scenario, drill) for scenario in chosen]
    finally:
        await load.stop()
    return rows, load


async def _scenario(rig: Rig, load: Load, scenario: Scenario, drill: Drill) -> dict:
    restarts = {name: s["restarts"] for name, s in rig.refresh()["services"].items()}
    load.begin(scenario.name)
    await asyncio.sleep(drill.lead_s)
    _say(f"{scenario.name}: {scenario.what}")
    seen = await scenario.inject(rig, load, drill)
    healed = time.monotonic()
    recovery_s = None
    while time.monotonic() - healed < (scenario.recovery_timeout_s or drill.recovery_timeout_s):
        if await scenario.recovered(rig, load, healed, seen):
            recovery_s = round(time.monotonic() - healed, 1)
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(drill.tail_s)
    load.pause()
    await load.settle(scenario.name, drill.settle_s)
    after = {name: s["restarts"] for name, s in rig.refresh()["services"].items()}
    row = {"scenario": scenario.name, "what": scenario.what, **checks.answers(load, scenario.name),
           "recovery_s": recovery_s, "restarts": {n: after[n] - restarts.get(n, 0) for n in after},
           "seen": _seen(load, scenario.name, seen)}
    _say(f"{scenario.name}: {row['sent']} sent, {row['answered']} answered, "
         + (f"recovered in {recovery_s} s" if recovery_s is not None else "NOT recovered"))
    if "lingering" in seen:
        _say(f"{scenario.name}: the killed process was still there {seen['lingering']['after_s']} s after the kill, "
             f"gone after {seen.get('exit_s', '?')} s; its threads then: {json.dumps(seen['lingering']['threads'])}")
    return row


def _seen(load: Load, scenario: str, seen: dict) -> dict:
    """What the fault showed on the way, made serialisable, with the counts its checks need."""
    since = seen.get("since", 0.0)
    seen = {k: v for k, v in seen.items() if k not in ("since", "killed_pid", "killed_at", "router_pid")}
    if scenario == "poison-burst":
        seen["dead_letters"] = sum(1 for at, _ in load.dead_letters if at >= since)
        seen["error_replies"] = sum(1 for rid in seen["addressed"]
                                    if (r := load.final(rid)) is not None and r.result.status.value == "rejected")
    if scenario == "provider-faults":
        seen["moved_on"] = sum(1 for s in load.of(scenario) if (r := load.final(s.request.id)) is not None
                               and r.result.escalation_path[:1] == ["remote"] and r.result.model == "small")
    return seen


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def table(rows: list[dict]) -> str:
    def cells(r: dict) -> list[str]:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "-"
        return [r["scenario"], str(r["sent"]), str(r["answered"]), str(r["lost"]), errors,
                str(r["duplicate_replies"]), str(r["double_billed"]), str(r["unbilled"]),
                "yes" if r["books_equal_results"] else "NO",
                "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}",
                "held" if not r["problems"] else "BROKEN: " + "; ".join(r["problems"])]

    grid = [COLUMNS] + [cells(r) for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in grid)
