"""Sampled evals on real parts (Tansu, redis-server, chDB, the MiniLM embedder): a suite applied with
`switchyard quality apply` reaches a running worker, which samples the route's answers; the evaluator
scores them (exact, similarity, length, and a judge model called through the platform) and the sink
books the scores, no text, in ClickHouse. Then the model's answers degrade and the drift signal trips
within its window."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from schemas import ProviderSpec, Status
from schemas.quality import EvalSuite, ScoreRecord
from services.cli import quality_report
from services.evaluator.drift import Tracker, Window
from services.evaluator.service import Evaluator
from services.worker.provider import ProviderBackend
from services.worker.sampling import Sampler
from services.worker.service import Worker
from shared.client import Client
from shared.feed import CompactedFeed
from shared.suites import EVALUATOR_REPLY_TO
from shared.topics import suite_key
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

GOOD = "Paris is the capital of France."
BAD = "Bananas grow on tall green plants."


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint answering with `server.answer`; as the judge, with 9 when the
    answer it is shown names Paris and 1 otherwise."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.server.judge:
            shown = body["messages"][-1]["content"].split("Answer:")[-1]
            text = "9" if "Paris" in shown else "1"
        else:
            text = self.server.answer
        data = orjson.dumps({
            "id": "c1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        })
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


SUITE = """
suites:
  - tenant: {tenant}
    route: graded
    version: "1"
    sample_rate: 1.0
    checks:
      - {{kind: exact, name: exact, expected: "{good}", ignore_case: true}}
      - {{kind: similarity, name: like_reference, reference: "The capital of France is Paris.", floor: 0.6}}
      - {{kind: length, name: short, max_chars: 200}}
      - {{kind: judge, name: judged, route: judging, instructions: "Is the answer correct?", floor: 0.5}}
"""


@pytest.fixture
async def graded(broker, topics, redis_url, embedder, tmp_path):
    """Provider workers for the graded route (model big, with a sampler) and the judge (model flaky),
    and an evaluator with 2-second windows judged against the 4 before them (8 s: shorter than a test's
    good phase, so an earlier test's scores on the same route never make its baseline); yields (the
    answering stub, the evaluator, the tenant)."""
    redis = Redis.from_url(redis_url)
    servers, stops, tasks, closers = [], [], [], []
    worker_suites = CompactedFeed(broker, topics.suites, EvalSuite)
    evaluator_suites = CompactedFeed(broker, topics.suites, EvalSuite)
    await worker_suites.start()
    await evaluator_suites.start()
    for model, judge in (("big", False), ("flaky", True)):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
        server.answer, server.judge = GOOD, judge
        threading.Thread(target=server.serve_forever, daemon=True).start()
        backend = ProviderBackend(ProviderSpec(api="openai", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                               model=f"stub-{model}", timeout_s=10))
        worker = Worker(model=model, engine=backend, bootstrap=broker, topics=topics, redis=redis,
                        sampler=Sampler(worker_suites, topics) if not judge else None)
        stop = asyncio.Event()
        servers.append(server), stops.append(stop), closers.append(backend)
        tasks.append(asyncio.create_task(worker.run(stop)))
    judge_client = Client(broker, reply_to=EVALUATOR_REPLY_TO, topics=topics, timeout_s=60)
    await judge_client.start()
    evaluator = Evaluator(bootstrap=broker, topics=topics, suites=evaluator_suites, embed=embedder.embed,
                          judge_client=judge_client, drift_interval_s=0.2,
                          tracker=Tracker((Window("hourly", 2.0, 4),), min_samples=4, min_windows=3))
    stop = asyncio.Event()
    stops.append(stop)
    tasks.append(asyncio.create_task(evaluator.run(stop)))

    who = f"q{uuid.uuid4().hex[:8]}"
    suite_file = tmp_path / "suites.yaml"
    suite_file.write_text(SUITE.format(tenant=who, good=GOOD))
    env = dict(os.environ, SWITCHYARD_BOOTSTRAP=broker, SWITCHYARD_TOPIC_PREFIX=topics.prefix)
    applied = subprocess.run([sys.executable, "-m", "services.cli.main", "quality", "apply", str(suite_file)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert applied.returncode == 0, applied.stderr
    assert f"applied suite {who}/graded version 1" in applied.stdout
    for _ in range(100):  # the worker and the evaluator follow the suites topic
        if all(suite_key(who, "graded") in f.values for f in (worker_suites, evaluator_suites)):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the suite did not reach the worker and the evaluator")
    yield servers[0], evaluator, who
    for stop in stops:
        stop.set()
    await asyncio.gather(*tasks)
    await judge_client.close()
    for backend in closers:
        await backend.aclose()
    for server in servers:
        server.shutdown()
    await worker_suites.stop()
    await evaluator_suites.stop()
    await redis.aclose()


async def ask(client, who: str, n: int) -> None:
    # Each question different: the router would answer a repeat from memory, and no model would run.
    results = await asyncio.gather(*(client.complete(tenant=who, route="graded", max_tokens=8, messages=[
        {"role": "user", "content": f"capital of France? ({uuid.uuid4().hex[:6]})"}]) for _ in range(n)))
    assert all(r.status == Status.ok for r in results), [r.error for r in results if r.status != Status.ok]


async def wait_for_scores(store, who: str, expected: int, timeout_s: float = 60) -> list[dict]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        rows = store.query("SELECT * FROM switchyard.quality_scores FINAL WHERE tenant = {t:String}", {"t": who})
        if len(rows) >= expected or loop.time() > deadline:
            return rows
        await asyncio.sleep(0.2)


async def test_sampled_answers_are_scored_and_booked_without_their_text(graded, router, sink, client, store, broker,
                                                                       topics):
    stub, evaluator, who = graded
    env = dict(os.environ, SWITCHYARD_BOOTSTRAP=broker, SWITCHYARD_TOPIC_PREFIX=topics.prefix)
    shown = subprocess.run([sys.executable, "-m", "services.cli.main", "quality", "show", "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert {"tenant": who, "route": "graded"}.items() <= next(
        s for s in json.loads(shown.stdout)["suites"] if s["tenant"] == who).items()
    await ask(client, who, 6)
    rows = await wait_for_scores(store, who, 6)
    assert len(rows) == 6
    for row in rows:
        assert row["route"] == "graded" and row["model"] == "big" and row["suite_version"] == "1"
        assert row["passed"] and row["score"] > 0.9, row
        assert set(row["checks"]) == {"exact", "like_reference", "short", "judged"}
        assert row["checks"]["judged"] == pytest.approx(0.9)
        assert not any(GOOD in str(value) for value in row.values())  # numbers, never the answer
    hourly = store.query("SELECT * FROM switchyard.quality_by_hour WHERE tenant = {t:String}", {"t": who})
    assert sum(h["samples"] for h in hourly) == 6 and hourly[0]["pass_rate"] == 1.0

    stub.answer = BAD
    await ask(client, who, 4)
    rows = await wait_for_scores(store, who, 10)
    bad = [r for r in rows if not r["passed"]]
    assert len(bad) == 4
    for row in bad:
        assert row["checks"]["exact"] == 0.0 and row["checks"]["judged"] == pytest.approx(0.1)
        assert set(row["failed"]) == {"exact", "like_reference", "judged"} and row["score"] < 0.5


async def test_answers_that_degrade_trip_the_drift_signal_within_the_window(graded, router, sink, client, store):
    stub, evaluator, who = graded
    labels = {"route": "graded", "model": "big", "signal": "score", "window": "hourly"}
    loop = asyncio.get_running_loop()
    await ask(client, who, 3)  # the first answers wait for the router to join its groups
    # Good answers over four 2-second windows: the baseline.
    started = loop.time()
    while loop.time() - started < 9:
        await ask(client, who, 3)
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)
    assert ("graded", "big", "score", "hourly") not in evaluator.drifting
    assert REGISTRY.get_sample_value("switchyard_quality_drifting", labels) == 0
    assert REGISTRY.get_sample_value("switchyard_quality_band_low", labels) > 0.5

    stub.answer = BAD
    degraded = loop.time()
    while ("graded", "big", "score", "hourly") not in evaluator.drifting and loop.time() - degraded < 10:
        await ask(client, who, 3)
        await asyncio.sleep(0.1)
    tripped_after_s, tripped_at_s = loop.time() - degraded, time.time()
    assert ("graded", "big", "score", "hourly") in evaluator.drifting
    assert tripped_after_s < 2 * 2.0 + 1  # within the window it degraded in, or the next one
    assert REGISTRY.get_sample_value("switchyard_quality_drifting", labels) == 1
    assert REGISTRY.get_sample_value("switchyard_quality_drift_events_total", labels) >= 1
    # A restarted evaluator rebuilds its baselines from the scores topic and sees the same drift.
    await asyncio.sleep(1)  # the scores of the last round on their way
    again = Evaluator(bootstrap=evaluator._bootstrap, topics=evaluator._topics, suites=evaluator._suites,
                      tracker=Tracker((Window("hourly", 2.0, 4),), min_samples=4, min_windows=3))
    assert await again.rebuild() >= evaluator.scored
    rebuilt = [s for s in again.tracker.states(tripped_at_s) if (s.route, s.model, s.signal) == ("graded", "big", "score")]
    assert rebuilt and rebuilt[0].drifting and rebuilt[0].band.windows >= 3
    # The judge's requests went through the platform but were never sampled themselves.
    judged = store.query("SELECT count() AS n FROM switchyard.quality_scores FINAL WHERE route = 'judging'")
    assert judged[0]["n"] == 0


def scored(who: str, at_s: float, score: float, i: int) -> ScoreRecord:
    return ScoreRecord(request_id=f"{who}-{at_s}-{i}", created_at_ms=int(at_s * 1000), ts_ms=int(at_s * 1000),
                       tenant=who, route="reported", model="m1", suite_version="1", score=score, passed=score > 0.5,
                       checks={"exact": score}, failed=[] if score > 0.5 else ["exact"], latency_ms=500,
                       confidence=0.8, escalated=False)


async def test_the_report_reads_scores_and_drift_from_the_books(store):
    who = f"r{uuid.uuid4().hex[:8]}"
    now_s = time.time()
    hour = (now_s // 3600) * 3600
    records = [scored(who, hour - h * 3600 + i, 0.9, i) for h in range(1, 6) for i in range(25)]
    records += [scored(who, hour + i * 0.01, 0.4, i) for i in range(25)]  # this hour: worse
    store.insert_scores(records)
    store.insert_scores(records[:10])  # a batch booked twice (the sink died before committing) counts once

    rows = quality_report.scores(store, ["route", "model"], since=datetime.fromtimestamp(hour - 6 * 3600, timezone.utc),
                                 tenant=who)
    assert len(rows) == 1 and rows[0]["samples"] == 150
    assert rows[0]["mean_score"] == pytest.approx((5 * 0.9 + 0.4) / 6, abs=1e-3)
    assert rows[0]["pass_rate"] == pytest.approx(5 / 6, abs=1e-3)

    drift = quality_report.drift(store, now_s=now_s, tenant=who)
    state = {(r["signal"], r["window"]): r for r in drift}
    hourly = state[("score", "hourly")]
    assert hourly["drifting"] and hourly["value"] == pytest.approx(0.4) and hourly["samples"] == 25
    assert hourly["baseline_windows"] == 5 and hourly["band_low"] == pytest.approx(0.85, abs=1e-3)
    assert not state[("latency_ms", "hourly")]["drifting"] and not state[("confidence", "hourly")]["drifting"]
    text = quality_report.render(rows, drift, ["route", "model"])
    assert "DRIFTING" in text and "reported" in text
