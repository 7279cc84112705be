"""Which models to skip: the workers' health reports, followed live.

Every worker reports its model's rolling p95 latency, error count, requests in flight and
backlog every few seconds on the health topic. The board keeps each worker's latest report;
a model is unhealthy while its fresh reports (younger than three of the worker's intervals)
break a limit its ModelSpec sets: p95 latency over `max_p95_latency_ms` (the worst worker),
error rate over `max_error_rate` (all workers' requests together, judged on ten or more), or
every worker full with more than `max_backlog` requests waiting. No fresh report means no
evidence: the model is not skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Gauge

from schemas import ModelHealth, PolicySet
from shared import kafka
from shared.codec import decode
from shared.errors import UndecodableMessage
from shared.topics import Topics

log = logging.getLogger(__name__)

STALE_INTERVALS = 3
MIN_REQUESTS_FOR_ERROR_RATE = 10
FRESH_TICK_MS = 100  # fresh() answers from memory within one tick (reports come every few seconds)
HEALTHY = Gauge("switchyard_router_model_healthy", "1 while the router considers the model healthy.", ["model"])


class HealthBoard:
    def __init__(self):
        self._latest: dict[tuple[str, str], ModelHealth] = {}
        # fresh() for the current tick, per model: the router asks for every request it forwards.
        self._fresh: dict[str, list[ModelHealth]] = {}
        self._fresh_tick = -1

    def report(self, health: ModelHealth) -> None:
        key = (health.model, health.worker)
        known = self._latest.get(key)
        if known is None or health.ts_ms >= known.ts_ms:
            self._latest[key] = health
            self._fresh.clear()

    def fresh(self, model: str, now_ms: int | None = None) -> list[ModelHealth]:
        if now_ms is not None:
            return self._select(model, now_ms)
        now_ms = int(time.time() * 1000)
        tick = now_ms // FRESH_TICK_MS
        if tick != self._fresh_tick:
            self._fresh.clear()
            self._fresh_tick = tick
        found = self._fresh.get(model)
        if found is None:
            found = self._fresh[model] = self._select(model, now_ms)
        return found

    def _select(self, model: str, now_ms: int) -> list[ModelHealth]:
        return [h for (m, _), h in self._latest.items()
                if m == model and now_ms - h.ts_ms <= STALE_INTERVALS * h.interval_s * 1000]

    def why_unhealthy(self, model: str, policies: PolicySet, now_ms: int | None = None) -> str | None:
        spec = policies.models.get(model)
        reports = self.fresh(model, now_ms)
        if spec is None or not reports:
            return None
        latencies = [h.p95_latency_ms for h in reports if h.p95_latency_ms is not None]
        if spec.max_p95_latency_ms is not None and latencies and max(latencies) > spec.max_p95_latency_ms:
            return f"p95 latency {max(latencies)} ms is over {spec.max_p95_latency_ms}"
        requests = sum(h.requests for h in reports)
        errors = sum(h.errors for h in reports)
        if (spec.max_error_rate is not None and requests >= MIN_REQUESTS_FOR_ERROR_RATE
                and errors / requests > spec.max_error_rate):
            return f"error rate {errors / requests:.0%} is over {spec.max_error_rate:.0%}"
        backlog = sum(h.backlog for h in reports)
        if (spec.max_backlog is not None and all(h.in_flight >= h.capacity for h in reports)
                and backlog > spec.max_backlog):
            return f"overloaded: every worker full and {backlog} requests waiting (limit {spec.max_backlog})"
        return None

    def unhealthy(self, policies: PolicySet) -> dict[str, str]:
        """Model -> why, for every model of the policy that should be skipped now."""
        out = {}
        for model in policies.models:
            why = self.why_unhealthy(model, policies)
            HEALTHY.labels(model).set(0 if why else 1)
            if why:
                out[model] = why
        return out

    async def follow(self, bootstrap: str, topics: Topics, stop: asyncio.Event) -> None:
        """Read the health topic from its end until `stop`; reports older than that are stale anyway."""
        consumer = kafka.consumer(bootstrap, topics.health, group_id=None, auto_offset_reset="latest", off_path=True)
        await consumer.start()
        try:
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        try:
                            self.report(decode(ModelHealth, record.value))
                        except UndecodableMessage as exc:
                            log.warning("ignored a health report: %s", exc)
        finally:
            await consumer.stop()
