"""Prometheus metrics every service shares, the bounded tenant label, and serving them on a port.

Conventions: names start with `switchyard_`, say their unit (`_seconds`, `_records`, `_usd`) and
end in `_total` when they count. Labels are bounded sets: route, model, tier, status, priority,
consumer group, topic, partition, reason code. A tenant appears as a label only through
`tenant_label`, which keeps the first SWITCHYARD_METRICS_TENANTS (default 50) tenants a process
sees and folds the rest into `_other`, so a platform with a million tenants still has a few
thousand series. The books in ClickHouse hold every tenant exactly; metrics are for seeing.
"""

from __future__ import annotations

import asyncio
import logging
import os

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from shared import kafka

log = logging.getLogger(__name__)

OTHER_TENANTS = "_other"
LAG_INTERVAL_S = 5.0

# From 5 ms to two minutes: a cache answer at one end, a long generation on a CPU at the other.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

CONSUMER_LAG = Gauge(
    "switchyard_consumer_lag_records",
    "Records on a partition that its consumer group has not taken yet (high watermark minus position).",
    ["group", "topic", "partition"],
)
CONSUMER_BATCH = Histogram(
    "switchyard_consumer_batch_records", "Records taken off the broker in one fetch, by consumer group.",
    ["group"], buckets=COUNT_BUCKETS,
)
DEAD_LETTERS = Counter(
    "switchyard_dead_letters_total", "Messages set aside on the dead-letter topic, by the topic they came from and why.",
    ["topic", "reason"],
)
REDIS_DEGRADED = Gauge(
    "switchyard_redis_degraded",
    "1 while this part of the service runs without Redis (no caches, repeats or limits there), 0 once it answers.",
    ["part"],
)


class RedisDegraded:
    """`part.degraded = True/False` on an object that leans on Redis, shown as switchyard_redis_degraded{part}."""

    def __init__(self, part: str):
        self.part = part

    def __set_name__(self, owner, name: str) -> None:
        self._attr = f"_{name}"

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self._attr, False)

    def __set__(self, obj, value: bool) -> None:
        setattr(obj, self._attr, value)
        REDIS_DEGRADED.labels(self.part).set(1 if value else 0)


class BoundedLabels:
    """The first `limit` values (tenants, routes) keep their names as label values; later ones share `_other`."""

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError("a label limit cannot be negative")
        self.limit = limit
        self._kept: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self._kept:
            return tenant
        if len(self._kept) < self.limit:
            self._kept.add(tenant)
            return tenant
        return OTHER_TENANTS


def _limit(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip() or str(default)
    if not value.isdigit():
        log.warning("%s must be a whole number, got %r; using %d", name, value, default)
        return default
    return int(value)


tenant_label = BoundedLabels(_limit("SWITCHYARD_METRICS_TENANTS", 50))
# Routes come from the policy, but a cost record of a request for an unknown route carries
# whatever its sender wrote: where a service cannot check the policy, this bounds them.
route_label = BoundedLabels(_limit("SWITCHYARD_METRICS_ROUTES", 200))


def serve(port: int | None, service: str) -> None:
    """Expose this process's metrics at http://0.0.0.0:<port>/metrics (nothing if port is None)."""
    if port:
        start_http_server(port)
        log.info("%s metrics on :%d/metrics", service, port)


async def track_lag(consumer, group: str, stop: asyncio.Event, interval_s: float = LAG_INTERVAL_S) -> None:
    """Keep CONSUMER_LAG current for the partitions `consumer` owns, until `stop` is set or cancelled.
    The high watermark comes with every fetch, so this asks the broker nothing."""
    shown: set[tuple[str, int]] = set()
    while not stop.is_set():
        owned = set()
        try:
            for tp, waiting in (await kafka.lag(consumer)).items():
                CONSUMER_LAG.labels(group, tp.topic, str(tp.partition)).set(waiting)
                owned.add((tp.topic, tp.partition))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a gauge must never stop a service
            log.debug("could not read consumer positions: %r", exc)
            owned |= shown
        for topic, partition in shown - owned:
            # Another member owns it now and reports it.
            CONSUMER_LAG.remove(group, topic, str(partition))
        shown = owned
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
