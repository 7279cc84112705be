"""The evaluator: takes sampled answers off the samples topic (group "evaluator"), scores each
against its suite, publishes a score record (numbers, no text) to the scores topic, and keeps the
drift signals of every route and model against their baselines, as Prometheus gauges.

Order, as in the sink: score a batch, publish its score records and wait for the broker to take
them, then commit. A crash in between scores the batch again; the books collapse the copies
(one row per request id). At start it reads the scores topic from its beginning (8 days are kept)
to rebuild the baselines, so a restart does not wait a day to see drift again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka.structs import ConsumerRecord

from schemas.quality import EvalSuite, JudgeCheck, Sample, ScoreRecord, SimilarityCheck
from services.evaluator import checks, metrics
from services.evaluator.drift import State, Tracker
from services.evaluator.judge import judge
from shared.suites import suite_for
from shared import kafka
from shared import metrics as shared_metrics
from shared.client import Client
from shared.codec import decode, encode
from shared.errors import UndecodableMessage
from shared.feed import CompactedFeed
from shared.outcomes import Outcomes, delivered
from shared.topics import Topics, score_key

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, *, bootstrap: str, topics: Topics, suites: CompactedFeed[EvalSuite],
                 embed: checks.Embed | None = None, judge_client: Client | None = None, tracker: Tracker | None = None,
                 group_id: str = "evaluator", max_in_flight: int = 32, drift_interval_s: float = 5.0,
                 clock: Callable[[], float] = time.time):
        self._bootstrap = bootstrap
        self._topics = topics
        self._suites = suites
        self._embed = embed
        self._judge_client = judge_client
        self.tracker = tracker or Tracker()
        self._group_id = group_id
        self._max_in_flight = max_in_flight
        self._drift_interval_s = drift_interval_s
        self._clock = clock
        self.scored = 0
        self.drifting: set[tuple[str, str, str, str]] = set()  # (route, model, signal, window) out of band now

    async def run(self, stop: asyncio.Event) -> None:
        rebuilt = await self.rebuild()
        async with kafka.consuming(self._bootstrap, [self._topics.samples], group_id=self._group_id,
                                   off_path=True) as (
            consumer, producer
        ):
            log.info("evaluator consuming %s (baselines rebuilt from %d scores)", self._topics.samples, rebuilt)
            side = [asyncio.create_task(self._suites.follow(None, stop)),
                    asyncio.create_task(self._watch(stop)),
                    asyncio.create_task(shared_metrics.track_lag(consumer, self._group_id, stop))]
            outcomes = Outcomes(producer, self._topics)
            try:
                while not stop.is_set():
                    batch = await consumer.getmany(timeout_ms=200, max_records=self._max_in_flight)
                    if batch:
                        await self._take(consumer, batch, outcomes)
            finally:
                for task in side:
                    task.cancel()
                await asyncio.gather(*side, return_exceptions=True)

    async def _take(self, consumer, batch: dict, outcomes: Outcomes) -> None:
        records = [record for rows in batch.values() for record in rows]
        scored = [s for s in await asyncio.gather(*(self._score(r, outcomes) for r in records)) if s is not None]

        async def send() -> list[asyncio.Future]:
            return [await outcomes.send(self._topics.scores, encode(s), score_key(s.request_id)) for s in scored]

        await delivered(send())
        await kafka.commit(consumer, {tp: rows[-1].offset + 1 for tp, rows in batch.items()})
        for record in scored:
            self.tracker.observe(record)
            metrics.SCORED.labels(record.route, record.model, "passed" if record.passed else "failed").inc()
            metrics.SCORE.labels(record.route, record.model).observe(record.score)
        self.scored += len(scored)

    async def _score(self, record: ConsumerRecord, outcomes: Outcomes) -> ScoreRecord | None:
        try:
            sample = decode(Sample, record.value)
        except UndecodableMessage as exc:
            await delivered(outcomes.dead_letter(record, exc.code, str(exc)))
            return None
        route, model = shared_metrics.route_label(sample.route), sample.model
        suite = suite_for(self._suites.values, sample.tenant, sample.route)
        if suite is None:
            metrics.SCORED.labels(route, model, "no_suite").inc()
            return None
        applying = [c for c in suite.checks if checks.applies(c, sample)]
        local = [c for c in applying if not isinstance(c, JudgeCheck)]
        if any(isinstance(c, SimilarityCheck) for c in local):
            verdicts = await asyncio.to_thread(lambda: [checks.run(c, sample, self._embed) for c in local])
        else:
            verdicts = [checks.run(c, sample, self._embed) for c in local]
        for check in applying:
            if isinstance(check, JudgeCheck):
                verdicts.append(await judge(self._judge_client, check, sample) if self._judge_client is not None
                                else checks.Verdict(check.name, None, False, "no judge client"))
        score = checks.combine(suite, sample, verdicts)
        if score is None:
            metrics.SCORED.labels(route, model, "unscored").inc()
        return score

    async def rebuild(self) -> int:
        """Feed the tracker every score still on the scores topic; how many."""
        consumer = kafka.consumer(self._bootstrap, group_id=None)
        await consumer.start()
        count = 0
        try:
            async for record in kafka.from_start(consumer, self._topics.scores, timeout_s=120):
                try:
                    self.tracker.observe(decode(ScoreRecord, record.value))
                    count += 1
                except UndecodableMessage as exc:
                    log.warning("skipping a score record at %s@%d: %s", record.topic, record.offset, exc)
        finally:
            await consumer.stop()
        return count

    async def _watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.show(self.tracker.states(self._clock()))
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._drift_interval_s)
            except TimeoutError:
                pass

    def show(self, states: list[State]) -> None:
        """Set the drift gauges, and count every series that has just left its band."""
        for state in states:
            labels = (shared_metrics.route_label(state.route), state.model, state.signal, state.window)
            key = (state.route, state.model, state.signal, state.window)
            # NaN until the window has its samples: a gap on the dashboard, not the last window's value.
            metrics.SIGNAL.labels(*labels).set(state.value if state.value is not None else float("nan"))
            if state.band is not None:
                metrics.BAND_LOW.labels(*labels).set(state.band.low)
                metrics.BAND_HIGH.labels(*labels).set(state.band.high)
            metrics.DRIFTING.labels(*labels).set(1 if state.drifting else 0)
            if state.drifting and key not in self.drifting:
                metrics.DRIFTS.labels(*labels).inc()
                log.warning("drift: %s on route %s, model %s, %s window: %.3f outside [%.3f, %.3f]",
                            state.signal, state.route, state.model, state.window, state.value,
                            state.band.low, state.band.high)
            (self.drifting.add if state.drifting else self.drifting.discard)(key)
