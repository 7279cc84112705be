"""`switchyard topics create|describe` and `switchyard status` against the real broker (Tansu):
partition counts asked for are the ones made, lag is exactly what was not committed, workers
show alive only while they report, and the policy in force is the one applied."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from aiokafka.structs import TopicPartition

from schemas import ModelHealth
from services.cli.main import main
from services.router import feed
from services.router.policy import load
from shared import kafka
from shared.codec import encode
from shared.topics import Topics
from tests.integration.conftest import MODELS

pytestmark = pytest.mark.integration


@pytest.fixture
def deployment(broker, policy_file, monkeypatch, tmp_path) -> Topics:
    """A prefix of its own, so counts and offsets are this test's alone; the CLI's env pointed at it."""
    topics = Topics(f"fleet{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("SWITCHYARD_BOOTSTRAP", broker)
    monkeypatch.setenv("SWITCHYARD_TOPIC_PREFIX", topics.prefix)
    monkeypatch.setenv("SWITCHYARD_POLICY", str(policy_file))
    monkeypatch.setenv("SWITCHYARD_DATA_DIR", str(tmp_path))
    return topics


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *args: str) -> dict:
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_create_makes_the_partition_counts_asked_and_leaves_existing_topics_alone(deployment, capsys):
    t = deployment
    code, out, err = cli(capsys, "topics", "create", "--partitions", "interactive=12,batch=3,small=24")
    assert code == 0, err
    assert f"created {t.model('small')} (24 partitions)" in out

    described = {d["name"]: d for d in cli_json(capsys, "topics", "describe")["topics"]}
    counts = {name: d["partitions"] for name, d in described.items()}
    assert counts[t.requests("interactive")] == 12
    assert counts[t.requests("standard")] == 6  # the default, untouched
    assert counts[t.requests("batch")] == 3
    assert counts[t.model("small")] == 24
    others = [m for m in MODELS if m != "small"]  # every model of the test policy
    assert {counts[t.model(m)] for m in others} == {6}
    assert set(counts) == {s.name for s in t.plan(MODELS)}
    assert all(d["replication_factor"] == 1 and d["records"] == 0 for d in described.values())
    # Tansu reports what a topic was created with: the compacted policies topic, the health retention.
    assert described[t.policies]["config"] == {"cleanup.policy": "compact"}
    assert described[t.health]["config"] == {"retention.ms": str(3600 * 1000)}
    assert described[t.costs]["config"] == {}

    # Asked again with other counts: nothing changes, and the lines say why.
    code, out, err = cli(capsys, "topics", "create", "--partitions", "interactive=4,small=30")
    assert code == 0, err
    lines = {line.split()[1]: line for line in out.splitlines()}
    interactive = lines[t.requests("interactive")]
    assert "12 partitions" in interactive and "4 asked, left as is" in interactive
    assert "cannot remove partitions" in interactive
    assert "30 asked, left as is" in lines[t.model("small")] and "moves keys" in lines[t.model("small")]
    assert lines[t.requests("standard")].startswith("exists ") and "asked" not in lines[t.requests("standard")]
    counts = {d["name"]: d["partitions"] for d in cli_json(capsys, "topics", "describe")["topics"]}
    assert counts[t.requests("interactive")] == 12 and counts[t.model("small")] == 24

    code, out, _ = cli(capsys, "topics", "describe")
    assert code == 0 and t.policies in out and "cleanup.policy=compact" in out


@pytest.mark.parametrize("value, message", [
    ("foo=3", "partitions for 'foo': not a priority (interactive, standard, batch) nor a model"),
    ("small=0", "the count for 'small' must be a positive integer"),
    ("interactive=-2", "the count for 'interactive' must be a positive integer"),
    ("batch=x", "the count for 'batch' must be a positive integer"),
    ("small", "--partitions takes name=count pairs"),
])
def test_bad_partitions_exit_2_naming_the_problem_and_create_nothing(deployment, capsys, value, message):
    code, out, err = cli(capsys, "topics", "create", "--partitions", value)
    assert code == 2
    assert err.startswith("switchyard: ") and message in err, err
    assert cli_json(capsys, "topics", "describe")["topics"] == []


def test_status_reports_the_exact_lag_of_each_group(deployment, broker, capsys):
    t = deployment
    # A model of its own: consumer groups are not prefixed, and the session's vLLM worker is in worker.small.
    model = f"lagged{uuid.uuid4().hex[:6]}"
    assert cli(capsys, "topics", "create", "--models", f"small,{model}", "--partitions", f"{model}=3")[0] == 0
    asyncio.run(_produce_and_consume(broker, t, model))

    view = cli_json(capsys, "status")
    assert set(view) >= {"topics", "groups", "workers", "policy"}
    groups = {g["group"]: g for g in view["groups"]}
    # The deployment's groups: the routers', the sink's, one per model of the policy and per model topic.
    assert {"router.interactive", "router.standard", "router.batch", "sink", "worker.small", "worker.large",
            "worker.big", "worker.flaky", f"worker.{model}"} <= set(groups)

    worker = groups[f"worker.{model}"]
    by_partition = {p["partition"]: (p["committed"], p["end"], p["lag"]) for p in worker["partitions"]}
    # 4, 3 and 3 records; committed 4 on partition 0, 1 on partition 1, nothing on partition 2.
    assert by_partition == {0: (4, 4, 0), 1: (1, 3, 2), 2: (None, 3, 3)}
    assert worker["lag"] == 5 and worker["topics"] == [t.model(model)]
    # Tansu answers DescribeGroups (its member list is not expired when a consumer leaves).
    assert worker["state"] is not None and isinstance(worker["members"], int)
    # Nothing consumed: the lag is every record on the topic.
    assert groups["router.standard"]["lag"] == 2
    assert all(p["committed"] is None for p in groups["router.standard"]["partitions"])
    assert groups["router.interactive"]["lag"] == 0 and groups["sink"]["lag"] == 0
    assert {x["name"]: x["records"] for x in view["topics"]}[t.model(model)] == 10

    code, out, err = cli(capsys, "status")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith(f"worker.{model} "))
    assert row.split()[3:8] == [t.model(model), "5", "10", "5", "2:3"]  # committed, end, lag, worst partition


async def _produce_and_consume(broker: str, t: Topics, model: str) -> None:
    producer = kafka.producer(broker)
    await producer.start()
    try:
        for partition, n in ((0, 4), (1, 3), (2, 3)):
            for i in range(n):
                await producer.send_and_wait(t.model(model), b"{}", partition=partition)
        for _ in range(2):
            await producer.send_and_wait(t.requests("standard"), b"{}", key=b"chat")
    finally:
        await producer.stop()
    consumer = kafka.consumer(broker, t.model(model), group_id=f"worker.{model}")
    await consumer.start()  # joins the group (a few seconds on Tansu)
    try:
        seen, deadline = 0, time.monotonic() + 30
        while seen < 10 and time.monotonic() < deadline:
            seen += sum(len(r) for r in (await consumer.getmany(timeout_ms=500)).values())
        assert seen == 10
        await consumer.commit({TopicPartition(t.model(model), 0): 4, TopicPartition(t.model(model), 1): 1})
    finally:
        await consumer.stop()


def health(worker: str, ts_ms: int, **load) -> ModelHealth:
    values = dict(model="small", worker=worker, ts_ms=ts_ms, interval_s=2.0, window_s=30.0, requests=12, errors=0,
                  p95_latency_ms=120, in_flight=3, capacity=8, backlog=4, kv_usage=0.25)
    values.update(load)
    return ModelHealth(**values)


def test_status_shows_workers_alive_with_their_load_and_not_the_silent_ones(deployment, broker, capsys):
    t = deployment
    now = int(time.time() * 1000)
    reports = [
        health("host:1", now - 1500, in_flight=1),  # superseded by its newer report
        health("host:1", now - 500),
        health("host:2", now - 60_000),  # 60 s old with a 2 s interval: silent, not alive
        health("host:3", now - 15 * 60_000),  # older than the two minutes looked at
    ]
    asyncio.run(_publish_health(broker, t, reports))

    workers = {w["worker"]: w for w in cli_json(capsys, "status")["workers"]}
    assert set(workers) == {"host:1", "host:2"}
    alive = workers["host:1"]
    assert alive["alive"] is True and alive["model"] == "small"
    assert (alive["in_flight"], alive["capacity"], alive["backlog"], alive["kv_usage"], alive["p95_latency_ms"]) == (
        3, 8, 4, 0.25, 120)
    assert alive["age_s"] < 30
    assert workers["host:2"]["alive"] is False

    code, out, err = cli(capsys, "status")
    assert code == 0, err
    assert "Workers: 1 alive" in out
    row = next(line for line in out.splitlines() if "host:1" in line).split()
    assert row[:7] == ["small", "host:1", "alive", "3/8", "4", "25%", "120"]
    assert next(line for line in out.splitlines() if "host:2" in line).split()[2] == "silent"


async def _publish_health(broker: str, t: Topics, reports: list[ModelHealth]) -> None:
    await kafka.ensure_topics(broker, t.plan([]))
    producer = kafka.producer(broker)
    await producer.start()
    try:
        for report in reports:
            await producer.send_and_wait(t.health, encode(report))
    finally:
        await producer.stop()


def test_status_shows_the_policy_in_force_and_its_models_groups(deployment, broker, policy_file, capsys):
    t = deployment
    asyncio.run(kafka.ensure_topics(broker, t.plan([])))
    policy = cli_json(capsys, "status")["policy"]
    assert policy["applied"] is False and "routers use their policy file" in policy["note"]
    assert "routers use their policy file" in cli(capsys, "status")[1]

    file = load(policy_file)
    applied = file.model_copy(update={"version": "fleet-7", "models": {**file.models, "fresh": file.models["small"]}})
    asyncio.run(feed.publish(broker, t, applied))

    view = cli_json(capsys, "status")
    assert view["policy"]["applied"] is True and view["policy"]["version"] == "fleet-7"
    assert "fresh" in view["policy"]["models"]
    # The worker groups are those of the policy in force, even for a model with no topic yet.
    fresh = next(g for g in view["groups"] if g["group"] == "worker.fresh")
    assert fresh["topics"] == [t.model("fresh")] and fresh["partitions"] == [] and fresh["lag"] == 0
    code, out, err = cli(capsys, "status")
    assert code == 0 and "Policy: version fleet-7 in force" in out, err
    assert "(no such topic)" in next(line for line in out.splitlines() if line.startswith("worker.fresh "))


def test_admin_requests_a_broker_refuses_are_reported_as_such_not_fatal(deployment, capsys, monkeypatch):
    """Tansu answers every admin request status uses; a broker that refuses some still gets a view."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import UnsupportedVersionError

    async def refused(*args, **kwargs):
        raise UnsupportedVersionError("not here")

    assert cli(capsys, "topics", "create")[0] == 0
    for name in ("list_consumer_groups", "describe_consumer_groups", "list_consumer_group_offsets",
                 "describe_configs"):
        monkeypatch.setattr(AIOKafkaAdminClient, name, refused)

    described = cli_json(capsys, "topics", "describe")["topics"]
    assert described and all(t["config"] is None for t in described)
    view = cli_json(capsys, "status")
    assert view["groups_listed"] is False
    assert all(g["lag"] is None and g["state"] is None for g in view["groups"])
    code, out, err = cli(capsys, "status")
    assert code == 0, err
    assert "offsets not reported by this broker" in out and "listing groups is not reported by this broker" in out
    assert "not reported by this broker" in cli(capsys, "topics", "describe")[1]
