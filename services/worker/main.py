"""Entry point of a worker process: one backend (a vLLM engine or a provider API), one model topic."""

from __future__ import annotations

import asyncio
from pathlib import Path

from schemas.quality import EvalSuite
from services.router.policy import load
from services.worker.engine import Engine, EngineConfig
from services.worker.provider import ProviderBackend
from services.worker.sampling import Sampler
from services.worker.service import Worker
from shared import metrics
from shared.feed import CompactedFeed
from shared.errors import ConfigError
from shared.kafka import wait_for_broker
from shared.redis_conn import connect
from shared.settings import Settings


async def serve(settings: Settings, stop: asyncio.Event, *, model: str, model_path: Path | None = None,
                max_in_flight: int = 64) -> None:
    if not settings.bootstrap:
        raise ConfigError("a worker needs SWITCHYARD_BOOTSTRAP (or run `switchyard up`)")
    policies = load(settings.policy_file)
    if model not in policies.models:
        raise ConfigError(f"model {model!r} is not in the policy {settings.policy_file} "
                          f"(models: {', '.join(policies.models)})")
    await wait_for_broker(settings.bootstrap)
    # Redis holds results for repeats and caches; without it the worker still serves. Connected before
    # the backend starts, so that refused credentials stop the process with no engine to shut down.
    redis = await connect(settings.redis_url, required=False) if settings.redis_url else None
    metrics.serve(settings.metrics_port, f"worker {model}")
    spec = policies.models[model]
    if spec.provider is not None:
        backend = ProviderBackend(spec.provider, max_connections=max_in_flight)
    else:
        path = model_path or settings.models_dir / model
        backend = Engine.start(EngineConfig(model_path=path, max_model_len=spec.max_context_tokens,
                                            max_num_seqs=max_in_flight, name=model))
    # The eval suites say which answers to sample for scoring (services/worker/sampling.py).
    suites = CompactedFeed(settings.bootstrap, settings.topics.suites, EvalSuite)
    try:
        await suites.start()
        worker = Worker(model=model, engine=backend, bootstrap=settings.bootstrap, topics=settings.topics,
                        max_in_flight=max_in_flight, redis=redis, sampler=Sampler(suites, settings.topics))
        await worker.run(stop)
    finally:
        await suites.stop()
        if isinstance(backend, ProviderBackend):
            await backend.aclose()
        else:
            backend.shutdown()
        if redis is not None:
            await redis.aclose()
