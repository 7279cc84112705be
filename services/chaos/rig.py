"""The stack a drill runs on: `switchyard up` on a broker, a Redis and a provider API that the
drill owns, so it can restart the one, stop the other and make the third misbehave.

Redis keeps an append-only file, so that what it holds outlives its restart. Tansu keeps its
data in memory, which a restart loses; a `durable` rig's Tansu stores in S3 (moto on loopback)
instead, where topics and committed offsets outlive it. That storage keeps up with a few
messages a second here (each fetch lists the partition's objects), so a durable rig serves the
provider model alone at a low rate: it is the broker-restart drill's, and the other drills run
on the in-memory broker at full rate. Its clients give a fetch DURABLE_FETCH_WAIT_MS: Tansu
must list a partition's objects within a fetch's wait, and a listing cut short answers nothing,
so at the default 50 ms a partition of a few hundred objects on a busy machine is never read.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.chaos.provider import FakeProvider
from services.stack import infra
from services.stack.status import Samples, parse
from services.worker import tiny_model
from shared import kafka
from shared.errors import DependencyUnavailable
from shared.topics import Topics

TOPIC_PREFIX = "chaos"
STACK_START_TIMEOUT_S = 120
STACK_STOP_TIMEOUT_S = 180
PROVIDER_TIMEOUT_S = 1.5
# Measured here on Tansu 0.6.0 and moto: with two busy loops on the two cores, 500 objects in a
# partition gave empty fetches for 20 s at a 50 ms wait and were read in 1.9 s at 1000 ms. Tansu
# answers only at the end of a wait, so each hop takes about a quarter of it more (300 ms).
DURABLE_FETCH_WAIT_MS = 1000

# One self-hosted tiny model and one provider model. Routes: plain, cached (repeats and exact
# hits live in Redis), and provider-first with the self-hosted model to fall back on. A durable
# rig serves the provider model alone.
POLICY = """
version: "chaos-1"
unknown_route: reject
models:
  small: {{tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.60, max_context_tokens: 1024}}
  remote:
    tier: small
    price_in_usd_per_mtok: 0.10
    price_out_usd_per_mtok: 0.40
    max_error_rate: 0.5
    provider: {{api: openai, base_url: "{base_url}", model: chaos, timeout_s: {timeout_s}}}
routes:
  chat: {{models: [{local}], max_output_tokens: 12}}
  faq: {{models: [{local}], max_output_tokens: 12, cache: {{exact: true, ttl_s: 3600}}}}
  assist: {{models: [remote{fallback}], max_output_tokens: 12}}
"""


class Rig:
    """Start with `start()`, stop with `stop()` (which lets the sink flush: the books are then complete)."""

    def __init__(self, data_dir: Path, durable: bool = False):
        self.data_dir = data_dir
        self.durable = durable
        self.models = ("remote",) if durable else ("small", "remote")
        self.logs = data_dir / "logs"
        self.provider: FakeProvider | None = None
        self._store: infra.Process | None = None
        self._broker: infra.Process | None = None
        self._redis: infra.Process | None = None
        self._redis_port: int | None = None
        self._up: subprocess.Popen | None = None
        self.state: dict = {}

    @property
    def bootstrap(self) -> str:
        return self._broker.address

    @property
    def fetch_wait_ms(self) -> int:
        """How long its clients' fetches wait at the broker (SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS)."""
        return DURABLE_FETCH_WAIT_MS if self.durable else kafka.fetch_wait_ms()

    @property
    def clickhouse_dsn(self) -> str:
        return self.state["clickhouse_dsn"]

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        model = self.data_dir / "models" / "small"
        if not self.durable and not tiny_model.exists(model):
            tiny_model.generate(model, layers=2, hidden=128)
        if self.durable:
            self._store = infra.start_object_store(**self._quiet("object-store"))
        self._broker = self._start_broker(infra.free_port())
        if self.durable:
            # Fewer partitions, fewer objects for Tansu to list on every fetch.
            asyncio.run(kafka.ensure_topics(self.bootstrap, Topics(TOPIC_PREFIX).plan(
                list(self.models), {name: 1 for name in (*self.models, "interactive", "standard", "batch")})))
        self._redis_port = infra.free_port()
        shutil.rmtree(self.data_dir / "redis", ignore_errors=True)  # each drill starts with an empty Redis
        self.start_redis()
        self.provider = FakeProvider(stall_s=PROVIDER_TIMEOUT_S * 3)
        policy = self.data_dir / "policy.yaml"
        policy.write_text(POLICY.format(base_url=self.provider.base_url, timeout_s=PROVIDER_TIMEOUT_S,
                                        local="remote" if self.durable else "small",
                                        fallback="" if self.durable else ", small"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
        env.update(SWITCHYARD_DATA_DIR=str(self.data_dir), SWITCHYARD_POLICY=str(policy),
                   SWITCHYARD_BOOTSTRAP=self.bootstrap, SWITCHYARD_REDIS_URL=self._redis.address,
                   SWITCHYARD_TOPIC_PREFIX=TOPIC_PREFIX, SWITCHYARD_EMBEDDINGS="off", PYTHONUNBUFFERED="1",
                   SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS=str(self.fetch_wait_ms))
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        self._up = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up", "--models", ",".join(self.models)],
                                    env=env,
                                    stdout=open(self.logs / "stack.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STACK_START_TIMEOUT_S
        while not self.state:
            if self._up.poll() is not None:
                raise DependencyUnavailable(f"switchyard up exited with {self._up.returncode}; see {self.logs / 'stack.log'}")
            if time.monotonic() > deadline:
                raise DependencyUnavailable(f"switchyard up wrote no stack.json within {STACK_START_TIMEOUT_S} s")
            self.refresh()
            time.sleep(0.2)

    def stop(self) -> None:
        if self._up is not None and self._up.poll() is None:
            self._up.send_signal(signal.SIGINT)
            try:
                self._up.wait(STACK_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._up.kill()
                self._up.wait()
        for name in ("_redis", "_broker", "_store"):
            proc = getattr(self, name)
            if proc is not None:
                proc.stop()
                setattr(self, name, None)
        if self.provider is not None:
            self.provider.stop()

    def refresh(self) -> dict:
        """stack.json as `switchyard up` last wrote it (pids change when it restarts a service)."""
        try:
            state = json.loads((self.data_dir / "stack.json").read_text())
        except (OSError, ValueError):
            return self.state
        if self._up is not None and state.get("pid") == self._up.pid:
            self.state = state
        return self.state

    def pid(self, service: str) -> int:
        return self.refresh()["services"][service]["pid"]

    def kill(self, service: str) -> int:
        """SIGKILL to the service's whole process group, as when its container dies; the pid killed."""
        pid = self.pid(service)
        os.killpg(pid, signal.SIGKILL)
        return pid

    def stop_redis(self) -> None:
        self._redis.stop()  # SIGTERM: redis-server writes its append-only file out and exits

    def start_redis(self) -> None:
        self._redis = infra.start_redis(self.data_dir / "redis", self._redis_port, persist=True, **self._quiet("redis"))

    def stop_broker(self) -> None:
        if not self.durable:
            raise RuntimeError("this rig's broker keeps its data in memory: a restart would lose every topic")
        self._broker.stop()

    def start_broker(self) -> None:
        self._broker = self._start_broker(self._broker_port)

    def _start_broker(self, port: int) -> infra.Process:
        self._broker_port = port
        return infra.start_broker(port, object_store=self._store.address if self._store else None,
                                  **self._quiet("broker"))

    def _quiet(self, name: str) -> dict:
        return {"stdout": open(self.logs / f"{name}.log", "ab"), "stderr": subprocess.STDOUT, "start_new_session": True}

    async def metrics(self, service: str) -> Samples | None:
        """The service's metrics now, or None while it does not answer."""
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return parse((await http.get(self.refresh()["metrics"][service])).text)
        except (httpx.HTTPError, KeyError):
            return None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return (self.logs / "stack.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""
