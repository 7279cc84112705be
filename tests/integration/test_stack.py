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

import psutil
import pytest

from schemas import Status
from shared.client import Client
from shared.topics import Topics
from tests.integration.conftest import POLICY, ROOT, WORKER_READY_TIMEOUT_S

pytestmark = pytest.mark.integration


def _wait_for_state(path, proc, timeout_s=60) -> dict:
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
        # The whole tree, vLLM's engine processes included, now that the engine is up.
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        for part in ("tansu", "redis-server", " router", " sink", "worker --model small", "VLLM::EngineCore"):
            assert part in names, f"{part!r} not running under switchyard up"

        proc.send_signal(signal.SIGINT)
        assert proc.wait(180) == 0
        tree = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert tree == [], f"left running after Ctrl-C: {[p.cmdline() for p in tree]}"
        assert not (data_dir / "stack.json").exists()
        assert _count_books(state["clickhouse_dsn"]) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
        print(log_path.read_text()[-4000:])
