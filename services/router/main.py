"""Entry point of a router process."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from services.router.feed import PolicyFeed
from services.router.policy import load
from services.router.limits import TenantLimiter
from services.router.seen import ForwardedLog
from services.router.service import Router
from shared.errors import ConfigError
from shared.kafka import wait_for_broker
from shared.settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    if not settings.bootstrap or not settings.redis_url:
        raise ConfigError("a router needs SWITCHYARD_BOOTSTRAP and SWITCHYARD_REDIS_URL (or run `switchyard up`)")
    await wait_for_broker(settings.bootstrap)
    feed = PolicyFeed(settings.bootstrap, settings.topics)
    policies = await feed.start()
    if policies is None:
        policies = load(settings.policy_file)
        log.warning("no policy applied to %s yet; using %s (apply one with `switchyard policy apply FILE`)",
                    settings.topics.policies, settings.policy_file)
    redis = Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        router = Router(bootstrap=settings.bootstrap, topics=settings.topics, policies=policies,
                        forwarded=ForwardedLog(redis), limiter=TenantLimiter(redis), feed=feed)
        await router.run(stop)
    finally:
        await feed.stop()
        await redis.aclose()
