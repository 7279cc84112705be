"""The fleet CLI's logic without a broker: --partitions and the plan, which DescribeConfigs entries
are a topic's own, lag arithmetic, and what the tables say when a broker does not answer."""

from __future__ import annotations

import pytest
from aiokafka.structs import TopicPartition

from services.cli.fleet import (NOT_REPORTED, _create_line, group_lag, known_groups, own_settings,
                                parse_partitions, render_groups, render_status, render_workers)
from shared.errors import ConfigError
from shared.topics import MODEL_PARTITIONS, REQUEST_PARTITIONS, Topics, TopicSpec

T = Topics("sy")


def test_partitions_parse_and_reach_the_plan():
    counts = parse_partitions(" interactive=12, batch = 3,small=24")
    assert counts == {"interactive": 12, "batch": 3, "small": 24}
    plan = {s.name: s.partitions for s in T.plan(["small", "large"], counts)}
    assert plan["sy.requests.interactive"] == 12 and plan["sy.requests.batch"] == 3
    assert plan["sy.requests.standard"] == REQUEST_PARTITIONS
    assert plan["sy.model.small"] == 24 and plan["sy.model.large"] == MODEL_PARTITIONS
    assert T.plan(["small"]) == T.plan(["small"], None) == T.plan(["small"], {})
    assert parse_partitions(None) is None


@pytest.mark.parametrize("value, message", [
    ("small=0", "count for 'small' must be a positive integer"),
    ("small=-1", "count for 'small'"),
    ("small=2.5", "count for 'small'"),
    ("small", "name=count pairs"),
    ("=3", "name=count pairs"),
    ("small=1,,batch=2", "name=count pairs"),
    ("small=1,small=2", "names 'small' twice"),
])
def test_malformed_partitions_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_partitions(value)


def test_the_plan_refuses_unknown_names_and_bad_counts():
    with pytest.raises(ConfigError, match="'medium': not a priority .* nor a model \\(small, large\\)"):
        T.plan(["small", "large"], {"medium": 3})
    with pytest.raises(ConfigError, match="'small' must be a positive integer"):
        T.plan(["small"], {"small": 0})
    with pytest.raises(ConfigError, match="ambiguous"):
        T.plan(["batch"], {"batch": 2})


def test_a_count_that_differs_from_the_topic_is_reported_not_applied():
    spec = TopicSpec("sy.model.small", 12)
    assert _create_line(spec, True, 12) == "created sy.model.small (12 partitions)"
    assert _create_line(spec, False, 12) == "exists  sy.model.small (12 partitions)"
    grow = _create_line(spec, False, 6)
    assert grow.startswith("exists  sy.model.small (6 partitions) -- 12 asked, left as is") and "moves keys" in grow
    assert "cannot remove partitions" in _create_line(spec, False, 24)


def entry(name, value, source):
    return {"config_names": name, "config_value": value, "config_source": source}


def test_own_settings_from_kafka_tansu_and_v0_answers():
    # Apache Kafka: every config with its source; 1 is the topic's own.
    kafka = [entry("cleanup.policy", "compact", 1), entry("retention.ms", "604800000", 5),
             *(entry(f"x{i}", "1", 5) for i in range(30)), entry("segment.bytes", "1073741824", 4)]
    assert own_settings(kafka) == {"cleanup.policy": "compact"}
    assert own_settings([entry(f"x{i}", "1", 5) for i in range(30)]) == {}
    # Tansu: only what the topic was created with, marked DEFAULT_CONFIG.
    assert own_settings([entry("retention.ms", "3600000", 5)]) == {"retention.ms": "3600000"}
    assert own_settings([]) == {}
    v0 = [{"config_names": "cleanup.policy", "config_value": "compact", "is_default": False},
          {"config_names": "retention.ms", "config_value": "1", "is_default": True}]
    assert own_settings(v0) == {"cleanup.policy": "compact"}


TOPIC_LIST = [
    {"name": "sy.model.small", "partitions": 3, "offsets": {0: (0, 4), 1: (2, 9), 2: (5, 5)}},
    {"name": "sy.costs", "partitions": 1, "offsets": {0: (0, 7)}},
]


def test_lag_counts_from_the_committed_offset_or_the_beginning():
    tp = lambda p: TopicPartition("sy.model.small", p)  # noqa: E731
    # Partition 1's commit is older than its beginning (retention deleted records): it would restart there.
    view = group_lag("worker.small", ["sy.model.small"], TOPIC_LIST, {tp(0): 3, tp(1): 1, tp(2): None})
    assert [(p["partition"], p["committed"], p["end"], p["lag"]) for p in view["partitions"]] == [
        (0, 3, 4, 1), (1, 1, 9, 7), (2, None, 5, 0)]
    assert view["lag"] == 8 and view["topics"] == ["sy.model.small"]
    nothing = group_lag("worker.small", ["sy.model.small"], TOPIC_LIST, {})
    assert nothing["lag"] == 4 + 7 + 0
    # A topic the group is not known to consume counts only where it committed.
    extra = group_lag("audit", [], TOPIC_LIST, {TopicPartition("sy.costs", 0): 5})
    assert extra["topics"] == ["sy.costs"] and extra["lag"] == 2
    assert group_lag("audit", [], TOPIC_LIST, {})["partitions"] == []


def test_groups_the_broker_does_not_report_say_so():
    unknown = group_lag("sink", ["sy.costs"], TOPIC_LIST, None)
    assert unknown["lag"] is None and unknown["partitions"][0]["lag"] is None
    out = render_groups([unknown], listed=False)
    row = out.splitlines()[2].split()
    assert row[:3] == ["sink", "?", "?"] and row[6] == "?"
    assert f"offsets {NOT_REPORTED}" in out and f"state and members: {NOT_REPORTED}" in out
    assert f"listing groups is {NOT_REPORTED}" in out


def test_group_rows_sum_offsets_and_show_the_worst_partitions_first():
    many = [{"name": "sy.model.small", "partitions": 8, "offsets": {p: (0, 10) for p in range(8)}}]
    view = group_lag("worker.small", ["sy.model.small"], many,
                     {TopicPartition("sy.model.small", p): p for p in range(8)})
    view.update(state="Stable", members=2)
    row = render_groups([view]).splitlines()[2].split()
    assert row[:7] == ["worker.small", "Stable", "2", "sy.model.small", str(sum(range(8))), "80", str(80 - 28)]
    assert row[7:] == ["0:10", "1:9", "2:8", "3:7", "4:6", "5:5", "(+2", "more)"]
    missing = group_lag("worker.fresh", ["sy.model.fresh"], many, {})
    assert render_groups([missing]).splitlines()[2].split()[3:] == ["sy.model.fresh", "-", "-", "0", "(no", "such",
                                                                    "topic)"]


def test_known_groups_follow_the_services_group_ids():
    assert known_groups(T, ["small", "large", "small"]) == {
        "router.interactive": ["sy.requests.interactive"], "router.standard": ["sy.requests.standard"],
        "router.batch": ["sy.requests.batch"], "sink": ["sy.costs"],
        "worker.large": ["sy.model.large"], "worker.small": ["sy.model.small"]}


def test_status_text_without_policy_workers_or_topics():
    view = {"bootstrap": "b:9092", "prefix": "sy", "topics": [], "groups": [], "workers": [],
            "policy": {"applied": False, "version": None, "topic": "sy.policies",
                       "note": "no policy applied to sy.policies: routers use their policy file"}}
    out = render_status(view)
    assert "Policy: no policy applied to sy.policies: routers use their policy file" in out
    assert "switchyard topics create" in out and "Workers: 0 alive" in out and "no health reports" in out
    worker = {"model": "small", "worker": "h:1", "alive": True, "age_s": 2.4, "in_flight": 0, "capacity": 64,
              "backlog": 0, "kv_usage": None, "p95_latency_ms": None}
    assert render_workers([worker]).splitlines()[2].split() == ["small", "h:1", "alive", "0/64", "0", "-", "-", "2s",
                                                                 "ago"]


def test_a_bad_reply_topic_name_is_refused_before_the_cluster_is_asked():
    from services.cli import fleet
    from shared.settings import Settings

    with pytest.raises(ConfigError, match="--reply-to 'no spaces'"):
        fleet.create_topics(Settings(bootstrap="127.0.0.1:1"), None, None, ["ok-name", "no spaces"])
