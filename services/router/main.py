"""Entry point of a router process."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from services.router.policy import load
from services.router.seen import ForwardedLog
from services.router.service import Router
from shared.errors import ConfigError
from shared.kafka import wait_for_broker
from shared.settings import Settings


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    if not settings.bootstrap or not settings.redis_url:
        raise ConfigError("a router needs SWITCHYARD_BOOTSTRAP and SWITCHYARD_REDIS_URL (or run `switchyard up`)")
    policies = load(settings.policy_file)
    await wait_for_broker(settings.bootstrap)
    redis = Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        router = Router(bootstrap=settings.bootstrap, topics=settings.topics, policies=policies,
                        forwarded=ForwardedLog(redis))
        await router.run(stop)
    finally:
        await redis.aclose()
