"""Entry point of a gateway process: `switchyard gateway`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn

from services.gateway.app import Gateway
from services.gateway.keys import KeyRing
from services.router.feed import PolicyFeed
from services.router.policy import load
from shared import metrics
from shared.client import Client
from shared.errors import ConfigError
from shared.kafka import wait_for_broker
from shared.settings import Settings

log = logging.getLogger(__name__)

# Every gateway replica reads the replies of all of them and keeps those it waits for: one topic
# however often pods come and go, at the price of reading the others' replies too.
REPLY_TO = "gateway"


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the process's stop event (shared.lifecycle) rules."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve(settings: Settings, stop: asyncio.Event, *, port: int | None = None, host: str = "0.0.0.0",
                ready: asyncio.Event | None = None) -> None:
    if not settings.bootstrap:
        raise ConfigError("a gateway needs SWITCHYARD_BOOTSTRAP (or run `switchyard up`)")
    if settings.gateway_keys is None:
        raise ConfigError("a gateway needs SWITCHYARD_GATEWAY_KEYS: a YAML file of API keys "
                          "(see deploy/gateway-keys.yaml)")
    keys = KeyRing.load(settings.gateway_keys)
    await wait_for_broker(settings.bootstrap)
    feed = PolicyFeed(settings.bootstrap, settings.topics)
    fallback = load(settings.policy_file)
    if await feed.start() is None:
        log.warning("no policy applied to %s yet; listing the routes of %s", settings.topics.policies,
                    settings.policy_file)
    metrics.serve(settings.metrics_port, "gateway")
    async with Client(settings.bootstrap, reply_to=REPLY_TO, topics=settings.topics,
                      replication_factor=settings.replication_factor) as client:
        gateway = Gateway(client, keys, lambda: feed.latest or fallback)
        server = _Server(uvicorn.Config(gateway.app, host=host, port=port or settings.gateway_port, lifespan="off",
                                        log_level="warning", access_log=False))
        following = asyncio.create_task(feed.follow(lambda p: log.info("policy version %s in force", p.version), stop))
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if serving.done():
            await serving  # it could not bind: say why
            raise ConfigError(f"the gateway could not listen on {host}:{port or settings.gateway_port}")
        log.info("gateway serving on http://%s:%d/v1 (%d API keys)", host, port or settings.gateway_port,
                 len(keys.keys))
        if ready is not None:
            ready.set()
        await stop.wait()
        # Stop taking requests, let those in flight finish (uvicorn waits for them), then stop reading replies.
        server.should_exit = True
        await serving
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
    await feed.stop()
