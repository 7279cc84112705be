"""Entry point of an evaluator process."""

from __future__ import annotations

import asyncio
import logging

from schemas.quality import EvalSuite
from services.evaluator.service import Evaluator
from shared.suites import EVALUATOR_REPLY_TO
from shared import metrics
from shared.client import Client
from shared.errors import ConfigError
from shared.feed import CompactedFeed
from shared.kafka import wait_for_broker
from shared.settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    if not settings.bootstrap:
        raise ConfigError("an evaluator needs SWITCHYARD_BOOTSTRAP (or run `switchyard up`)")
    await wait_for_broker(settings.bootstrap)
    metrics.serve(settings.metrics_port, "evaluator")
    embed = None
    if settings.embeddings:
        from services.router.embed import Embedder

        embed = (await asyncio.to_thread(Embedder)).embed
    else:
        log.warning("SWITCHYARD_EMBEDDINGS=off: similarity checks cannot run and are left out of scores")
    suites = CompactedFeed(settings.bootstrap, settings.topics.suites, EvalSuite)
    await suites.start()
    try:
        # Judge checks call a model through the platform, on a reply topic of the evaluator's own.
        async with Client(settings.bootstrap, reply_to=EVALUATOR_REPLY_TO, topics=settings.topics,
                          timeout_s=600) as client:
            await Evaluator(bootstrap=settings.bootstrap, topics=settings.topics, suites=suites, embed=embed,
                            judge_client=client).run(stop)
    finally:
        await suites.stop()
