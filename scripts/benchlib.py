"""What the benchmarks under scripts/ share: the machine they ran on, progress lines, plain tables."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine(note: str) -> dict:
    """The machine a benchmark ran on, for its JSON: CPU, cores, Python, kernel, and what shared it."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "note": note}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far, every thread (None where /proc cannot tell)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def columns(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows])
