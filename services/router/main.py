"""Entry point of a router process."""

from __future__ import annotations

import asyncio
import logging

from services.router.classify import Classifier, Model
from services.router.embed import Embedder
from services.router.static_embed import StaticEmbedder
from services.router.feed import PolicyFeed
from services.router.health import HealthBoard
from services.router.policy import load
from services.router.limits import TenantLimiter
from services.router.seen import ForwardedLog
from services.router.service import Router
from shared import metrics
from shared.errors import ConfigError
from shared.kafka import wait_for_broker
from shared.memory import Memory
from shared.redis_conn import connect
from shared.semantic import SemanticIndex
from shared.settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    if not settings.bootstrap or not settings.redis_url:
        raise ConfigError("a router needs SWITCHYARD_BOOTSTRAP and SWITCHYARD_REDIS_URL (or run `switchyard up`)")
    await wait_for_broker(settings.bootstrap)
    # Without Redis the router still routes (no limits, caches or redelivery check), and says so.
    redis = await connect(settings.redis_url, required=False)
    feed = PolicyFeed(settings.bootstrap, settings.topics)
    policies = await feed.start()
    if policies is None:
        policies = load(settings.policy_file)
        log.warning("no policy applied to %s yet; using %s (apply one with `switchyard policy apply FILE`)",
                    settings.topics.policies, settings.policy_file)
    embedder, classifier = await load_judgement(settings)
    static = await load_static_embedder(settings) if embedder is not None else None
    semantic = SemanticIndex(redis) if embedder is not None else None
    metrics.serve(settings.metrics_port, "router")
    try:
        if semantic is not None:
            await semantic.start()
        router = Router(bootstrap=settings.bootstrap, topics=settings.topics, policies=policies,
                        forwarded=ForwardedLog(redis), limiter=TenantLimiter(redis), feed=feed,
                        classifier=classifier, embedder=embedder, memory=Memory(redis), semantic=semantic,
                        health=HealthBoard(), static_embedder=static)
        await router.run(stop)
    finally:
        if semantic is not None:
            await semantic.stop()
        await feed.stop()
        await redis.aclose()


async def load_static_embedder(settings: Settings) -> StaticEmbedder:
    """The semantic caches' fast embedder: distilled from MiniLM into the models directory the first
    time (seconds), loaded from there after."""
    static = await asyncio.to_thread(StaticEmbedder, settings.models_dir)
    if static.distil_seconds is not None:
        log.info("distilled the static embedder into %s in %.1f s", settings.models_dir, static.distil_seconds)
    return static


async def load_judgement(settings: Settings) -> tuple[object | None, Classifier]:
    """The embedder (for the classifier and the semantic cache) and the classifier, as configured."""
    if not settings.embeddings:
        log.info("embeddings off: rules decide alone and semantic caches are not served")
        return None, Classifier(None)
    embedder = await asyncio.to_thread(Embedder)
    path = settings.classifier_path
    if not path.exists():
        log.warning("no classifier at %s: rules decide, the rest go to each route's cheapest tier "
                    "(train one with `switchyard router train FILE.jsonl`)", path)
        return embedder, Classifier(None)
    model = Model.load(path)
    log.info("classifier %s: threshold %.2f, trained on %s examples", path, model.threshold, model.meta.get("examples"))
    return embedder, Classifier(model, embedder)
