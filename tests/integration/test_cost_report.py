"""The books answer the CFO's question: `switchyard cost` and the views, on the ClickHouse engine
(chDB), with records as the router and workers write them: hand-offs, answers from memory, failures,
and a batch inserted twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from schemas import CacheHit, CostRecord, ModelPrice, Status, now_ms
from services.cli.cost import parse_by, parse_since, report
from shared.errors import ConfigError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LARGE = ModelPrice(in_nano_usd_per_token=2500, out_nano_usd_per_token=10000)


def records(tag: str) -> list[CostRecord]:
    """Two tenants on one route: plain answers, an escalation (two attempts), a repeat answered from
    memory, and a failure."""
    ts = now_ms()

    def rec(request: str, tenant: str, model: str, tokens_in: int, tokens_out: int, cost: int, *, attempt=0,
            status=Status.ok, cache=CacheHit.none, latency=100) -> CostRecord:
        return CostRecord(request_id=f"{tag}-{request}", attempt=attempt, ts_ms=ts, tenant=f"{tag}-{tenant}",
                          route=f"{tag}-route", model=model, priority="standard", status=status, cache_hit=cache,
                          tokens_in=tokens_in, tokens_out=tokens_out, cost_nano_usd=cost, latency_ms=latency)

    return [
        rec("a1", "acme", "small", 100, 10, 21_000),
        rec("a2", "acme", "small", 200, 20, 42_000, latency=300),
        rec("a3", "acme", "small", 50, 8, 12_300),                      # escalated: attempt 0 on small ...
        rec("a3", "acme", "large", 50, 12, 245_000, attempt=1),         # ... and attempt 1 on large
        rec("a4", "acme", "", 0, 0, 0, cache=CacheHit.idempotent),      # a repeat, from memory
        rec("g1", "globex", "large", 400, 40, 1_400_000),
        rec("g2", "globex", "small", 10, 0, 0, status=Status.failed),
    ]


def test_cost_by_tenant_is_exact_and_counts_a_replayed_batch_once(store):
    tag = f"c{uuid.uuid4().hex[:6]}"
    batch = records(tag)
    store.insert(batch)
    store.insert(batch)  # the sink died between insert and commit: the batch comes again
    since = datetime.now(timezone.utc) - timedelta(hours=1)
    rows = {r["tenant"]: r for r in report(store, ["tenant"], since=since, route=f"{tag}-route", versus=LARGE)}
    acme, globex = rows[f"{tag}-acme"], rows[f"{tag}-globex"]
    assert acme["requests"] == 4 and globex["requests"] == 2  # a request counts once, however many attempts
    assert acme["cost_nano_usd"] == 21_000 + 42_000 + 12_300 + 245_000
    assert globex["cost_nano_usd"] == 1_400_000
    assert (acme["tokens_in"], acme["tokens_out"]) == (400, 50)
    assert acme["from_memory"] == 1 and acme["handoffs"] == 1 and globex["not_ok"] == 1
    assert acme["versus_nano_usd"] == 400 * 2500 + 50 * 10000
    assert acme["saved"] == round(1 - acme["cost_nano_usd"] / acme["versus_nano_usd"], 4)
    assert list(rows) == [f"{tag}-globex", f"{tag}-acme"]  # dearest first

    by_model = {(r["route"], r["model"]): r for r in report(store, ["route", "model"], since=since,
                                                            tenant=f"{tag}-acme")}
    assert by_model[(f"{tag}-route", "large")]["cost_nano_usd"] == 245_000
    assert by_model[(f"{tag}-route", "small")]["requests"] == 3
    (hour,) = report(store, ["hour"], since=since, route=f"{tag}-route")
    assert hour["requests"] == 6 and hour["hour"].endswith(":00+00:00")
    assert report(store, ["tenant"], since=since + timedelta(hours=2), route=f"{tag}-route") == []


def test_the_views_answer_hit_rate_latency_and_escalation_by_route(store):
    tag = f"v{uuid.uuid4().hex[:6]}"
    store.insert(records(tag))
    route = {"route": f"{tag}-route"}
    (cache,) = store.query("SELECT * FROM switchyard.cache_by_route WHERE route = {route:String}", route)
    assert (cache["requests"], cache["repeats"], cache["exact_hits"]) == (6, 1, 0)
    assert cache["hit_rate"] == pytest.approx(1 / 6)
    (escalation,) = store.query("SELECT * FROM switchyard.escalation_by_route WHERE route = {route:String}", route)
    assert (escalation["requests"], escalation["handed_on"]) == (6, 1)
    latency = {r["model"]: r for r in store.query(
        "SELECT * FROM switchyard.latency_by_route_model WHERE route = {route:String}", route)}
    assert set(latency) == {"small", "large"}  # answers from memory ran no model
    assert latency["small"]["records"] == 4 and latency["small"]["p99_latency_ms"] >= 100
    # The saving against all-large, by tenant, route and hour: the same figure `cost --versus` prints.
    savings = {r["tenant"]: r for r in store.query(
        "SELECT * FROM switchyard.savings_by_hour(in_nano = {i:UInt64}, out_nano = {o:UInt64}) "
        "WHERE route = {route:String}", {**route, "i": LARGE.in_nano_usd_per_token, "o": LARGE.out_nano_usd_per_token})}
    acme = savings[f"{tag}-acme"]
    assert acme["reference_nano_usd"] == 400 * 2500 + 50 * 10000
    assert acme["cost_nano_usd"] == 320_300
    assert acme["saved"] == pytest.approx(1 - 320_300 / 1_500_000)


def test_arguments_are_checked_with_clear_errors():
    now = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert parse_by("route, model,route") == ["route", "model"]
    with pytest.raises(ConfigError, match="--since"):
        parse_since("yesterday", now)
    with pytest.raises(ConfigError, match="--by"):
        parse_by("tenant,colour")


def test_switchyard_cost_from_the_terminal(tmp_path):
    """The command as a user runs it, on its own chDB (one engine per process: each step is a process)."""
    dsn = f"chdb://{tmp_path / 'chdb'}"
    env = dict(os.environ, SWITCHYARD_CLICKHOUSE_DSN=dsn, SWITCHYARD_DATA_DIR=str(tmp_path))
    seed = textwrap.dedent(f"""
        from services.sink.store import CostStore, TABLE
        from tests.integration.test_cost_report import records
        store = CostStore.connect({dsn!r}, ttl_days=400)
        store.insert(records("cli"))
        print(store.query(f"SHOW CREATE TABLE {{TABLE}}")[0])
    """)
    seeded = subprocess.run([sys.executable, "-c", seed], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert seeded.returncode == 0, seeded.stderr
    assert "TTL toDateTime(ts) + toIntervalDay(400)" in seeded.stdout

    def cost(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli.main", "cost", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    out = cost("--by", "tenant", "--since", "1h", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["versus"] == "large" and doc["by"] == ["tenant"]
    assert {r["tenant"]: r["cost_nano_usd"] for r in doc["rows"]} == {"cli-acme": 320_300, "cli-globex": 1_400_000}
    table = cost("--by", "route,model", "--tenant", "cli-acme")
    assert table.returncode == 0, table.stderr
    assert "cli-route" in table.stdout and "0.000245000" in table.stdout and "total" in table.stdout
    refused = cost("--by", "colour")
    assert refused.returncode == 2 and "--by takes" in refused.stderr
