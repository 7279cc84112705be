"""`switchyard up`: the whole platform on one machine.

Starts what is not configured (Tansu broker, redis-server), creates the topics, then runs the
sink, the router, the evaluator, the gateway and one worker per model as child processes with
prefixed logs. Children
live in their own sessions so that Ctrl-C reaches only the supervisor, which stops them in
the order that loses nothing: router and workers first (they drain what is in flight), then the
evaluator (it scores the last samples), then the sink (it flushes the last cost records and
scores), then Redis and the broker.

A child that dies is restarted, as a container runtime would, after a back-off that doubles
with each recent restart; Kafka redelivers what it had not committed. A child that keeps
dying (CRASH_LOOP_RESTARTS within CRASH_LOOP_WINDOW_S) stops the whole stack instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.router import feed
from services.router import static_embed
from services.router.policy import load
from services.stack import infra
from services.stack.status import StatusPage
from services.worker import tiny_model
from shared.errors import ConfigError
from shared.kafka import prepare
from shared.settings import Settings, masked

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
DEFAULT_STATUS_PORT = 8700
SERVICE_STOP_GRACE_S = 60.0
CRASH_LOOP_RESTARTS = 5
CRASH_LOOP_WINDOW_S = 300.0
MAX_RESTART_DELAY_S = 30.0
LOCAL_GATEWAY_KEYS = Path(__file__).resolve().parents[2] / "deploy" / "local" / "gateway-keys.yaml"
LOCAL_GATEWAY_KEY = "sk-switchyard-local"  # its SHA-256 is in LOCAL_GATEWAY_KEYS; for this machine only


def state_path(settings: Settings) -> Path:
    return settings.data_dir / STATE_FILE


def read_state(settings: Settings) -> dict | None:
    """What a running `switchyard up` wrote about itself, or None if none is running."""
    path = state_path(settings)
    try:
        state = json.loads(path.read_text())
        os.kill(state["pid"], 0)
        return state
    except (OSError, ValueError, KeyError):
        return None


class _Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], metrics_port: int):
        self.name = name
        self.metrics_port = metrics_port
        self._argv = argv
        self._env = {**env, "SWITCHYARD_METRICS_PORT": str(metrics_port)}
        self.restarts: list[float] = []  # monotonic times of the restarts so far
        self.restart_at: float | None = None  # when a dead child is due to start again
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(self._argv, env=self._env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, text=True, errors="replace")
        self._pump = threading.Thread(target=self._print_lines, args=(self.proc,), daemon=True)
        self._pump.start()

    def _print_lines(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            sys.stdout.write(f"{self.name:<13}| {line}")
            sys.stdout.flush()

    def died(self, now: float) -> float | None:
        """The child has exited: clear away what is left of it and schedule its restart. The
        delay, or None when it is crash-looping and the stack should stop."""
        _kill_group(self.proc.pid)  # its own children (vLLM's engine processes) outlive a killed worker
        recent = [t for t in self.restarts if now - t < CRASH_LOOP_WINDOW_S]
        if len(recent) >= CRASH_LOOP_RESTARTS:
            return None
        delay = min(MAX_RESTART_DELAY_S, 2.0 ** len(recent))
        self.restart_at = now + delay
        return delay

    def restart(self, now: float) -> None:
        self._pump.join(timeout=2)
        self.restarts.append(now)
        self.restart_at = None
        self._start()

    def stop(self, grace_s: float) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, grace_s)
                _kill_group(self.proc.pid)
                self.proc.wait()
        self._pump.join(timeout=2)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def up(settings: Settings, models: list[str] | None = None) -> int:
    policies = load(settings.policy_file)
    models = models or list(policies.models)
    for model in models:
        if model not in policies.models:
            raise ConfigError(f"model {model!r} is not in {settings.policy_file} (models: {', '.join(policies.models)})")
        if policies.models[model].provider is None and not tiny_model.exists(settings.models_dir / model):
            raise ConfigError(f"no weights for model {model!r} at {settings.models_dir / model}; "
                              f"make a tiny one with `switchyard model tiny {settings.models_dir / model}`")
    if read_state(settings):
        raise ConfigError(f"a stack is already running on {settings.data_dir} ({state_path(settings)})")
    if not settings.bootstrap and settings.kafka_security.protocol != "PLAINTEXT":
        raise ConfigError(f"SWITCHYARD_KAFKA_SECURITY_PROTOCOL is {settings.kafka_security.protocol}, but the "
                          "embedded broker speaks PLAINTEXT only: set SWITCHYARD_BOOTSTRAP to your cluster, "
                          "or unset the SWITCHYARD_KAFKA_* settings")

    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    infra_procs: list[infra.Process] = []
    children: list[_Child] = []
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if not stopping.is_set():
            print(f"\nswitchyard up: {signal.Signals(signum).name} received, stopping", flush=True)
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    page = None
    try:
        bootstrap = settings.bootstrap
        if not bootstrap:
            broker = infra.start_broker(infra.free_port(9092), stdout=open(logs / "broker.log", "ab"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
            infra_procs.append(broker)
            bootstrap = broker.address
            print(f"broker       | Tansu (memory storage) at {bootstrap}, log {logs / 'broker.log'}", flush=True)
        redis_url = settings.redis_url
        if not redis_url:
            redis = infra.start_redis(settings.data_dir / "redis", stdout=open(logs / "redis.log", "ab"),
                                      stderr=subprocess.STDOUT, start_new_session=True)
            infra_procs.append(redis)
            redis_url = redis.address
            print(f"redis        | redis-server at {redis_url}, log {logs / 'redis.log'}", flush=True)
        specs = settings.topics.plan(models)
        for line in asyncio.run(prepare(bootstrap, specs, settings.replication_factor)):
            print(f"topics       | {line}", flush=True)
        print(f"policy       | {asyncio.run(_policy_in_force(bootstrap, settings, policies))}", flush=True)

        if settings.embeddings and not settings.classifier_path.exists():
            print(f"classifier   | none at {settings.classifier_path}; fitting one from the bundled labeled prompts",
                  flush=True)
            subprocess.run([sys.executable, "-m", "services.cli.main", "router", "train", "--out",
                            str(settings.classifier_path)], check=True, stdout=subprocess.DEVNULL,
                           stderr=open(logs / "train.log", "ab"))
        if settings.embeddings and not static_embed.cached(settings.models_dir):
            print(f"embedder     | distilling the semantic caches' static embedder into {settings.models_dir} "
                  "(once, under a minute)", flush=True)
            subprocess.run([sys.executable, "-m", "services.router.static_embed", str(settings.models_dir)],
                           check=True, stdout=subprocess.DEVNULL, stderr=open(logs / "train.log", "ab"))
        env = dict(os.environ)
        env.update({
            "SWITCHYARD_BOOTSTRAP": bootstrap,
            "SWITCHYARD_REDIS_URL": redis_url,
            "SWITCHYARD_CLICKHOUSE_DSN": settings.dsn(),
            "SWITCHYARD_DATA_DIR": str(settings.data_dir),
            "SWITCHYARD_POLICY": str(settings.policy_file),
            "SWITCHYARD_TOPIC_PREFIX": settings.topic_prefix,
            "PYTHONUNBUFFERED": "1",
            # Children stop by themselves if this process dies without stopping them.
            "SWITCHYARD_SUPERVISOR_PID": str(os.getpid()),
        })
        # vLLM warns at length about CPU tuning it cannot do here; its errors still show.
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        # A provider key goes to the worker of its model alone, not to every process the stack starts.
        provider_keys = {model: spec.provider.api_key_env for model, spec in policies.models.items()
                         if spec.provider is not None and spec.provider.api_key_env}
        for name in provider_keys.values():
            env.pop(name, None)
        me = [sys.executable, "-m", "services.cli.main"]
        # Each child serves its metrics on a port of its own: SWITCHYARD_METRICS_PORT and up, or
        # free ones the kernel picks.
        base = settings.metrics_port
        ports = iter(range(base, base + 4 + len(models)) if base else [])

        def port() -> int:
            return next(ports, None) or infra.free_port()

        children.append(_Child("sink", me + ["sink"], env, port()))
        children.append(_Child("router", me + ["router"], env, port()))
        children.append(_Child("evaluator", me + ["evaluator"], env, port()))
        gateway_keys = settings.gateway_keys or LOCAL_GATEWAY_KEYS
        gateway_port = infra.free_port(settings.gateway_port)
        children.append(_Child("gateway", me + ["gateway", "--host", "127.0.0.1", "--port", str(gateway_port)],
                               {**env, "SWITCHYARD_GATEWAY_KEYS": str(gateway_keys)}, port()))
        gateway_url = f"http://127.0.0.1:{gateway_port}/v1"
        for model in models:
            worker_env = dict(env)
            if model in provider_keys and provider_keys[model] in os.environ:
                worker_env[provider_keys[model]] = os.environ[provider_keys[model]]
            children.append(_Child(f"worker.{model}", me + ["worker", "--model", model], worker_env, port()))
        targets = {c.name: f"http://127.0.0.1:{c.metrics_port}/metrics" for c in children}
        page = StatusPage(targets, infra.free_port(settings.status_port or DEFAULT_STATUS_PORT))
        status_url = page.start()
        state = {
            "pid": os.getpid(), "bootstrap": bootstrap, "redis_url": redis_url, "clickhouse_dsn": settings.dsn(),
            "topic_prefix": settings.topic_prefix, "models": models, "started_at": time.time(),
            "metrics": targets, "status_url": status_url, "gateway_url": gateway_url,
        }

        def write_state() -> None:
            # Each service's pid and restart count: what `switchyard chaos` kills, and how a person sees a crash loop.
            state["services"] = {c.name: {"pid": c.proc.pid, "restarts": len(c.restarts)} for c in children}
            path = state_path(settings)
            path.with_suffix(".tmp").write_text(json.dumps(state) + "\n")
            path.with_suffix(".tmp").replace(path)

        write_state()
        for name, url in targets.items():
            print(f"metrics      | {name} at {url}", flush=True)
        keys = (f"key {LOCAL_GATEWAY_KEY} (tenant local)" if gateway_keys == LOCAL_GATEWAY_KEYS
                else f"keys from {gateway_keys}")
        print(f"gateway      | OpenAI-compatible API at {gateway_url}, {keys}; model=<route>", flush=True)
        print(f"stack        | up: broker {bootstrap}, redis {masked(redis_url)}, ClickHouse {masked(settings.dsn())}; "
              f"status page {status_url}; Ctrl-C stops everything", flush=True)

        while not stopping.wait(0.5):
            restarted = _tend(children)
            if restarted is None:
                code = 1
                break
            if restarted:
                write_state()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Front to back: nothing new enters, what is in flight finishes, its costs are booked.
        for group in (("gateway", "router"), tuple(c.name for c in children if c.name.startswith("worker.")),
                      ("evaluator",), ("sink",)):
            batch = [c for c in children if c.name in group]
            for child in batch:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            for child in batch:
                child.stop(SERVICE_STOP_GRACE_S)
        if page is not None:
            page.stop()
        for proc in reversed(infra_procs):
            proc.stop()
        state_path(settings).unlink(missing_ok=True)
        print("stack        | stopped", flush=True)
    return code


def _tend(children: list[_Child]) -> bool | None:
    """Restart the children that died, once their back-off has passed: whether one was started
    again, or None if one is crash-looping."""
    now = time.monotonic()
    restarted = False
    for child in children:
        if child.restart_at is not None:
            if now >= child.restart_at:
                print(f"stack        | starting {child.name} again (restart {len(child.restarts) + 1})", flush=True)
                child.restart(now)
                restarted = True
        elif child.proc.poll() is not None:
            delay = child.died(now)
            if delay is None:
                print(f"stack        | {child.name} exited with code {child.proc.returncode} after "
                      f"{CRASH_LOOP_RESTARTS} restarts within {CRASH_LOOP_WINDOW_S:.0f} s; stopping the stack",
                      flush=True)
                return None
            print(f"stack        | {child.name} exited with code {child.proc.returncode}; restarting it in "
                  f"{delay:.0f} s", flush=True)
    return restarted


async def _policy_in_force(bootstrap: str, settings: Settings, policies) -> str:
    """Apply the policy file unless the cluster already has a policy: a live change outlives a restart."""
    current = await feed.in_force(bootstrap, settings.topics)
    if current is not None:
        return f"version {current.version} in force on {settings.topics.policies} (file not applied)"
    await feed.publish(bootstrap, settings.topics, policies)
    return f"applied version {policies.version} from {settings.policy_file}"
