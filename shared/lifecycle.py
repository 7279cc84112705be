"""Running a service: uvloop, and SIGINT/SIGTERM turned into a stop event the service drains on."""

from __future__ import annotations

import asyncio
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
        await service(stop)

    uvloop.run(main())
