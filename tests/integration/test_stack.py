"""`switchyard up` as a user runs it: the stack starts its own broker, Redis and chDB, serves requests,
and one Ctrl-C stops every child after the books are written."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest

from schemas import Status
from services.stack.status import parse
from services.stack.supervisor import LOCAL_GATEWAY_KEY
from shared.client import Client
from shared.topics import Topics
from tests.integration.conftest import CHROMIUM_ARGS, POLICY, ROOT, WORKER_READY_TIMEOUT_S, chromium

pytestmark = pytest.mark.integration


def _wait_for_state(path, proc, timeout_s=300) -> dict:
    # `up` writes stack.json once it is up: after distilling the static embedder on a new data folder.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"switchyard up exited with {proc.returncode}"
        if path.exists():
            state = json.loads(path.read_text())
            if state["pid"] == proc.pid:
                return state
        time.sleep(0.2)
    pytest.fail("switchyard up wrote no stack.json")


def _count_books(dsn: str) -> int:
    # chDB holds one path per process, and this test process already has one: ask from another.
    code = ("import sys; from services.sink.store import CostStore; s = CostStore.connect(sys.argv[1]); "
            "print(s.query('SELECT count() AS n FROM switchyard.cost_records FINAL')[0]['n'])")
    out = subprocess.run([sys.executable, "-c", code, dsn], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


async def _check_metrics(targets: dict[str, str]) -> None:
    """Every child serves Prometheus metrics, and they say what just happened."""
    assert set(targets) == {"router", "gateway", "sink", "evaluator", "worker.small"}
    want = {  # (sample, labels it must have): the least it must count
        "router": [("switchyard_router_requests_total", {"route": "chat", "outcome": "routed"}, 5),
                   ("switchyard_router_queue_wait_seconds_count", {}, 5)],
        "worker.small": [("switchyard_worker_requests_total", {"route": "chat", "model": "small", "outcome": "ok"}, 5),
                         ("switchyard_worker_tokens_total", {"model": "small", "kind": "completion"}, 5),
                         ("switchyard_request_seconds_count", {"route": "chat", "model": "small"}, 5),
                         ("switchyard_engine_batch_size_count", {"model": "small"}, 1),
                         ("switchyard_worker_capacity", {"model": "small"}, 1),
                         ("switchyard_consumer_lag_records", {"group": "worker.small"}, 0)],
        "sink": [("switchyard_booked_requests_total", {"route": "chat", "model": "small", "status": "ok"}, 5),
                 ("switchyard_booked_cost_usd_total", {"tenant": "stack", "route": "chat", "model": "small"}, 1e-12),
                 ("switchyard_sink_records_total", {"outcome": "inserted"}, 5),
                 ("switchyard_consumer_lag_records", {"group": "sink"}, 0)],
        "gateway": [("switchyard_gateway_requests_total",
                     {"endpoint": "/v1/chat/completions", "route": "chat", "code": "200"}, 1)],
    }
    async with httpx.AsyncClient(timeout=5) as http:
        for name, expected in want.items():
            deadline = time.monotonic() + 30
            while True:  # the sink books in batches, the lag gauge is refreshed every few seconds
                samples = parse((await http.get(targets[name])).text)
                short = []
                for sample, labels, least in expected:
                    found = [v for (n, ls), v in samples.items() if n == sample and labels.items() <= dict(ls).items()]
                    if not found or sum(found) < least:
                        short.append((sample, labels, found))
                if not short or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert not short, f"{name} metrics lack {short}"


async def _check_status_page(url: str, screenshot) -> None:
    """The page a person opens, in a real headless Chromium: figures appear and refresh by themselves."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(url)
            assert await page.title() == "Switchyard status"
            # Filled in by the page's own script from /api/status, not by the server's HTML.
            await page.wait_for_selector('#tenants tbody tr[data-key="stack"]', timeout=30_000)
            await page.wait_for_function("document.getElementById('p50').textContent.endsWith('ms')", timeout=30_000)
            row = await page.inner_text('#tenants tbody tr[data-key="stack"]')
            assert float(row.split()[1]) > 0, row  # what tenant "stack" cost, in USD
            assert await page.inner_text('#models tbody tr[data-key="small"]')
            assert "down" not in await page.inner_text("#services")
            first = await page.inner_text("#updated")
            await page.wait_for_function(f"document.getElementById('updated').textContent !== {first!r}",
                                         timeout=10_000)
            await page.screenshot(path=str(screenshot), full_page=True)
        finally:
            await browser.close()


async def test_up_serves_requests_and_ctrl_c_stops_every_child(tmp_path, model_path, classifier_path):
    data_dir = tmp_path / "data"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / "small").symlink_to(model_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
    env.update(SWITCHYARD_DATA_DIR=str(data_dir), SWITCHYARD_POLICY=str(policy), VLLM_LOGGING_LEVEL="WARNING",
               SWITCHYARD_CLASSIFIER=str(classifier_path))
    log_path = tmp_path / "up.log"
    # The test policy names a "large" model nobody serves here: run the small one only.
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up", "--models", "small"], cwd=ROOT, env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        state = _wait_for_state(data_dir / "stack.json", proc)
        async with Client(state["bootstrap"], reply_to="stack-test", topics=Topics(state["topic_prefix"])) as client:
            results = await asyncio.gather(*(
                client.complete(tenant="stack", route="chat", prompt=f"hello {i}", timeout_s=WORKER_READY_TIMEOUT_S)
                for i in range(5)
            ))
        assert all(r.status == Status.ok and r.output for r in results)
        # The gateway `up` serves, with the local key it prints, as an OpenAI client would call it.
        gateway = openai.AsyncOpenAI(base_url=state["gateway_url"], api_key=LOCAL_GATEWAY_KEY, max_retries=0)
        reply = await gateway.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=4)
        assert reply.model == "small" and reply.usage.completion_tokens > 0
        await _check_metrics(state["metrics"])
        await _check_status_page(state["status_url"], tmp_path / "status.png")
        # The whole tree, vLLM's engine processes included, now that the engine is up.
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        for part in ("tansu", "redis-server", " router", " sink", " evaluator", " gateway", "worker --model small",
                     "VLLM::EngineCore"):
            assert part in names, f"{part!r} not running under switchyard up"

        proc.send_signal(signal.SIGINT)
        assert proc.wait(180) == 0
        tree = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert tree == [], f"left running after Ctrl-C: {[p.cmdline() for p in tree]}"
        assert not (data_dir / "stack.json").exists()
        assert _count_books(state["clickhouse_dsn"]) == 6
    finally:
        if proc.poll() is None:
            # A failed check: stop the stack as a user would, and leave nothing of it running.
            tree = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
            for child in tree:
                if child.is_running():
                    child.kill()
        print(log_path.read_text()[-4000:])


def test_a_service_whose_supervisor_died_stops_by_itself(tmp_path, broker):
    """`switchyard up` killed outright (SIGKILL) cannot stop its children: each notices and drains."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
    env.update(SWITCHYARD_BOOTSTRAP=broker, SWITCHYARD_DATA_DIR=str(tmp_path), SWITCHYARD_TOPIC_PREFIX="orphan")
    # A stand-in supervisor: starts the sink with its own pid as the supervisor's, then waits.
    code = ("import os, subprocess, sys, time; env = dict(os.environ, SWITCHYARD_SUPERVISOR_PID=str(os.getpid())); "
            "p = subprocess.Popen([sys.executable, '-m', 'services.cli.main', 'sink'], env=env); "
            "print(p.pid, flush=True); time.sleep(600)")
    log_path = tmp_path / "sink.log"
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                              stderr=open(log_path, "wb"))
    sink = psutil.Process(int(parent.stdout.readline()))
    try:
        time.sleep(3)
        assert sink.is_running() and sink.status() != psutil.STATUS_ZOMBIE
        parent.kill()
        parent.wait()
        sink.wait(60)  # raises if it is still running then (its exit code is not ours to read)
        log = log_path.read_text()
        assert "the supervisor (pid" in log and "Traceback" not in log, log
    finally:
        if sink.is_running():
            sink.kill()


PROVIDER_ONLY_POLICY = """
version: "restart-1"
models:
  remote: {tier: small, price_in_usd_per_mtok: 1.0, price_out_usd_per_mtok: 2.0,
           provider: {api: openai, base_url: "http://127.0.0.1:9/v1", model: m}}
routes:
  chat: {models: [remote], max_output_tokens: 8}
"""


def test_up_starts_a_killed_service_again(tmp_path, broker):
    """A service killed outright (SIGKILL, as the OOM killer does) is started again by `switchyard up`,
    which records the new pid and the restart in stack.json and keeps running."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(PROVIDER_ONLY_POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
    env.update(SWITCHYARD_DATA_DIR=str(tmp_path / "data"), SWITCHYARD_POLICY=str(policy), SWITCHYARD_BOOTSTRAP=broker,
               SWITCHYARD_TOPIC_PREFIX="restarts", SWITCHYARD_EMBEDDINGS="off")
    log_path = tmp_path / "up.log"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up"], cwd=ROOT, env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        state_file = tmp_path / "data" / "stack.json"
        state = _wait_for_state(state_file, proc)
        assert set(state["services"]) == {"sink", "router", "evaluator", "gateway", "worker.remote"}
        first = state["services"]["sink"]
        assert first["restarts"] == 0
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, "switchyard up stopped instead of starting the sink again"
            now = json.loads(state_file.read_text())["services"]["sink"]
            if now["pid"] != first["pid"]:
                break
            time.sleep(0.2)
        assert now == {"pid": now["pid"], "restarts": 1}, now
        assert psutil.Process(now["pid"]).is_running()
        # The others were left alone.
        assert all(json.loads(state_file.read_text())["services"][name] == state["services"][name]
                   for name in ("router", "evaluator", "gateway", "worker.remote"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
        log = log_path.read_text()
        assert "sink exited with code -9; restarting it in 1 s" in log and "starting sink again (restart 1)" in log
    finally:
        if proc.poll() is None:
            proc.kill()
        print(log_path.read_text()[-3000:])
