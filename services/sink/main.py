"""Entry point of a sink process."""

from __future__ import annotations

import asyncio

from services.sink.service import Sink
from services.sink.store import CostStore
from shared import metrics
from shared.errors import ConfigError
from shared.kafka import wait_for_broker
from shared.settings import Settings


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    if not settings.bootstrap:
        raise ConfigError("a sink needs SWITCHYARD_BOOTSTRAP (or run `switchyard up`)")
    await wait_for_broker(settings.bootstrap)
    metrics.serve(settings.metrics_port, "sink")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = CostStore.connect(settings.dsn(), ttl_days=settings.cost_ttl_days)
    try:
        await Sink(bootstrap=settings.bootstrap, topics=settings.topics, store=store).run(stop)
    finally:
        store.close()
