"""Running a service: uvloop, and SIGINT/SIGTERM turned into a stop event the service drains on.

A service started by `switchyard up` also stops (draining, as on SIGTERM) when the supervisor that
started it is gone, even if it died without a word (SIGKILL): SWITCHYARD_SUPERVISOR_PID names it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

import uvloop


def run(service: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `service(stop)` until it returns; the first SIGINT or SIGTERM sets `stop`."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        supervisor = os.environ.get("SWITCHYARD_SUPERVISOR_PID", "")
        watching = asyncio.create_task(_orphaned(int(supervisor), stop)) if supervisor.isdigit() else None
        try:
            await service(stop)
        finally:
            if watching is not None:
                watching.cancel()

    uvloop.run(main())


async def _orphaned(supervisor: int, stop: asyncio.Event, every_s: float = 1.0) -> None:
    """Set `stop` once this process's parent is no longer `supervisor` (it died; we were re-parented)."""
    while not stop.is_set():
        if os.getppid() != supervisor:
            logging.getLogger(__name__).warning("the supervisor (pid %d) is gone; stopping", supervisor)
            stop.set()
            return
        await asyncio.sleep(every_s)
