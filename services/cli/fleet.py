"""`switchyard topics create|describe` and `switchyard status`: the deployment as the broker sees it.

    switchyard topics create --partitions interactive=12,batch=3,small=24
    switchyard topics describe [--json]   # every topic: partitions, replicas, own settings, records
    switchyard status [--json]            # topics, consumer groups and their lag, workers and their load, policy

Everything is asked over the Kafka protocol (an admin client, and a consumer without a group for
offsets and the health topic), so it works on any cluster. Where a broker does not answer an
admin request (Tansu, the local broker, lacks some), the view says "not reported by this broker"
instead of failing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from contextlib import asynccontextmanager, contextmanager

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from schemas import ModelHealth, Priority
from schemas._base import NAME_PATTERN
from services.router.health import STALE_INTERVALS
from shared import kafka
from shared.codec import decode
from shared.errors import ConfigError, DependencyUnavailable, SwitchyardError, UndecodableMessage
from shared.settings import Settings
from shared.topics import Topics, TopicSpec

NOT_REPORTED = "not reported by this broker"
HEALTH_LOOKBACK_S = 120  # workers report every few seconds: two minutes covers many intervals
READ_TIMEOUT_S = 10.0
BROKER_TIMEOUT_S = 10.0
# DescribeConfigs' config_source (Kafka's ConfigSource): 1 is a setting of the topic itself.
TOPIC_CONFIG, DEFAULT_CONFIG = 1, 5
# Apache Kafka answers DescribeConfigs with every topic config (30-odd); a shorter answer whose
# entries are all marked DEFAULT_CONFIG (Tansu) lists only what the topic was created with.
FULL_CONFIG_ANSWER = 10


@contextmanager
def _quiet():
    """aiokafka logs every failed connection attempt; a command says once what went wrong."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# topics create


def parse_partitions(value: str | None) -> dict[str, int] | None:
    """'interactive=12,batch=3,small=24' -> counts; names are checked against the plan."""
    if value is None:
        return None
    counts: dict[str, int] = {}
    for item in value.split(","):
        name, sep, count = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ConfigError("--partitions takes name=count pairs separated by commas "
                              f"(e.g. interactive=12,batch=3,small=24); got {item.strip()!r}")
        if not re.fullmatch(r"[+-]?\d+", count) or int(count) < 1:
            raise ConfigError(f"--partitions {name}={count}: the count for {name!r} must be a positive integer")
        if name in counts:
            raise ConfigError(f"--partitions names {name!r} twice")
        counts[name] = int(count)
    return counts


def create_topics(settings: Settings, models: list[str] | None, partitions: str | None,
                  reply_to: list[str] | None = None) -> int:
    from services.router.policy import load

    counts = parse_partitions(partitions)
    # The plan is checked whole before anything reaches the cluster.
    specs = settings.topics.plan(models or list(load(settings.policy_file).models), counts)
    for name in reply_to or ():
        if not re.fullmatch(NAME_PATTERN, name):
            raise ConfigError(f"--reply-to {name!r}: a reply_to name is letters, digits, '_', '.' and '-', "
                              "at most 64 characters")
        specs.append(settings.topics.reply_spec(name))
    if not settings.bootstrap:
        raise ConfigError("set SWITCHYARD_BOOTSTRAP to the Kafka cluster to create topics on")
    with _quiet():
        lines = asyncio.run(_create(settings.bootstrap, specs, settings.replication_factor))
    print("\n".join(lines))
    return 0


async def _create(bootstrap: str, specs: list[TopicSpec], replication_factor: int) -> list[str]:
    await kafka.wait_for_broker(bootstrap, timeout_s=120)
    created = set(await kafka.ensure_topics(bootstrap, specs, replication_factor))
    async with _admin(bootstrap) as admin:
        have = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics([s.name for s in specs])
                if not t["error_code"]}
    return [_create_line(s, s.name in created, have.get(s.name, s.partitions)) for s in specs]


def _create_line(spec: TopicSpec, created: bool, have: int) -> str:
    line = f"{'created' if created else 'exists '} {spec.name} ({have} partitions)"
    # An existing topic is never changed: its partition count decides where every key lands.
    if have < spec.partitions:
        line += (f" -- {spec.partitions} asked, left as is: adding partitions moves keys to other partitions "
                 "(a route's requests lose their order, conversations their worker's KV cache); "
                 "add them on purpose with kafka-topics --alter when the topic is drained")
    elif have > spec.partitions:
        line += (f" -- {spec.partitions} asked, left as is: Kafka cannot remove partitions; "
                 "only deleting and recreating the topic (losing its records) would")
    return line


# ---------------------------------------------------------------------------------------------
# what the broker says


@asynccontextmanager
async def _admin(bootstrap: str):
    admin = kafka.admin(bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


@asynccontextmanager
async def _reader(bootstrap: str):
    reader = kafka.consumer(bootstrap, group_id=None, request_timeout_ms=15_000)
    await reader.start()
    try:
        yield reader
    finally:
        await reader.stop()


async def _topics(admin: AIOKafkaAdminClient, reader: AIOKafkaConsumer, topics: Topics) -> list[dict]:
    """Every topic of the deployment (its prefix, reply topics included), with each partition's
    beginning and end offsets; `records` is their difference summed (on a compacted topic, an
    upper bound)."""
    names = sorted(n for n in await admin.list_topics() if n.startswith(f"{topics.prefix}."))
    if not names:
        return []
    described = {t["topic"]: t for t in await admin.describe_topics(names) if not t["error_code"]}
    # Deleted meanwhile: not described.
    parts = {n: sorted(described[n]["partitions"], key=lambda p: p["partition"]) for n in names if n in described}
    tps = [TopicPartition(n, p["partition"]) for n, ps in parts.items() for p in ps]
    begin, end = await reader.beginning_offsets(tps), await reader.end_offsets(tps)
    out = []
    for name, ps in parts.items():
        tp = {p["partition"]: TopicPartition(name, p["partition"]) for p in ps}
        offsets = {p: (begin[tp[p]], end[tp[p]]) for p in tp}
        out.append({"name": name, "partitions": len(ps),
                    "replication_factor": max((len(p["replicas"]) for p in ps), default=0),
                    "offsets": offsets, "records": sum(e - b for b, e in offsets.values())})
    return out


async def _configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str] | None]:
    """Each topic's own settings (what differs from the broker's defaults); None where not reported."""
    out: dict[str, dict[str, str] | None] = {n: None for n in names}
    if not names:
        return out
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    except (KafkaError, OSError, ValueError):
        return out
    for response in responses:
        for resource in response.to_object()["resources"]:
            if resource["error_code"] == 0 and resource["resource_name"] in out:
                out[resource["resource_name"]] = own_settings(resource["config_entries"])
    return out


def own_settings(entries: list[dict]) -> dict[str, str]:
    """The settings of a DescribeConfigs answer that are the topic's own."""
    if entries and "is_default" in entries[0]:  # DescribeConfigs v0
        return {e["config_names"]: e["config_value"] for e in entries if not e["is_default"]}
    own = {e["config_names"]: e["config_value"] for e in entries if e.get("config_source") == TOPIC_CONFIG}
    if (not own and len(entries) < FULL_CONFIG_ANSWER
            and all(e.get("config_source") == DEFAULT_CONFIG for e in entries)):
        return {e["config_names"]: e["config_value"] for e in entries}
    return own


async def _list_groups(admin: AIOKafkaAdminClient) -> list[str] | None:
    try:
        return sorted({g[0] for g in await admin.list_consumer_groups()})
    except (KafkaError, OSError, ValueError):
        return None


async def _committed(admin: AIOKafkaAdminClient, group: str, tps: list[TopicPartition]) -> dict | None:
    """The group's committed offset on each of `tps` (None: nothing committed there); None if not reported."""
    if not tps:
        return {}
    try:
        # Always with explicit partitions: the "all partitions" form (topics null) is one Tansu
        # answers with a response aiokafka cannot read.
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
    except (KafkaError, OSError, ValueError):
        return None
    return {tp: (o.offset if o.offset >= 0 else None) for tp, o in offsets.items()}


async def _describe_group(admin: AIOKafkaAdminClient, group: str) -> dict | None:
    """State and member count; None if not reported. One group per request: Tansu garbles the
    answer to a DescribeGroups for several."""
    try:
        [response] = await admin.describe_consumer_groups([group])
        found = [g for g in response.to_object()["groups"] if g["group"] == group and g["error_code"] == 0]
    except (KafkaError, OSError, ValueError):
        return None
    return {"state": found[0]["state"], "members": len(found[0]["members"])} if found else None


def known_groups(topics: Topics, models: Iterable[str]) -> dict[str, list[str]]:
    """The groups a deployment runs, each with the topics it consumes (see the services' group ids)."""
    groups = {f"router.{p.value}": [topics.requests(p)] for p in Priority}
    groups["sink"] = [topics.costs]
    groups.update({f"worker.{m}": [topics.model(m)] for m in sorted(set(models))})
    return groups


def group_lag(name: str, consumes: list[str], topic_list: list[dict], committed: dict | None) -> dict:
    """Per partition: committed offset, end offset and lag. Nothing committed on a partition means
    the group would start from its beginning: lag = end - beginning."""
    partitions = []
    for t in topic_list:
        for p, (begin, end) in t["offsets"].items():
            offset = None if committed is None else committed.get(TopicPartition(t["name"], p))
            if t["name"] not in consumes and offset is None:
                continue
            if committed is None:
                lag = None
            else:
                lag = max(0, end - max(begin, offset if offset is not None else begin))
            partitions.append({"topic": t["name"], "partition": p, "committed": offset, "end": end, "lag": lag})
    lags = [p["lag"] for p in partitions]
    return {"group": name, "topics": sorted({p["topic"] for p in partitions} | set(consumes)),
            "state": None, "members": None,  # filled in where the broker answers DescribeGroups
            "lag": None if committed is None else sum(lags), "partitions": partitions}


async def _workers(reader: AIOKafkaConsumer, health: dict | None, now_ms: int) -> list[dict]:
    """Each worker's newest health report of the last HEALTH_LOOKBACK_S, alive when younger than
    three of its intervals (as the routers judge)."""
    if health is None:
        return []
    tps = [TopicPartition(health["name"], p) for p in health["offsets"]]
    ends = {tp: health["offsets"][tp.partition][1] for tp in tps}
    # Seek by time where the broker can; reading too much is only slower (reports carry their own ts_ms).
    try:
        found = await reader.offsets_for_times({tp: now_ms - HEALTH_LOOKBACK_S * 1000 for tp in tps})
    except (KafkaError, ValueError):
        found = {tp: None for tp in tps}
    reader.assign(tps)
    for tp in tps:
        hit = found.get(tp)
        reader.seek(tp, hit.offset if hit is not None else ends[tp])
    latest: dict[tuple[str, str], ModelHealth] = {}
    deadline = time.monotonic() + READ_TIMEOUT_S
    while time.monotonic() < deadline and [tp for tp in tps if await reader.position(tp) < ends[tp]]:
        for records in (await reader.getmany(*tps, timeout_ms=500)).values():
            for record in records:
                try:
                    report = decode(ModelHealth, record.value)
                except UndecodableMessage:
                    continue
                known = latest.get((report.model, report.worker))
                if known is None or report.ts_ms >= known.ts_ms:
                    latest[(report.model, report.worker)] = report
    out = []
    for h in latest.values():
        age_ms = now_ms - h.ts_ms
        if age_ms > HEALTH_LOOKBACK_S * 1000:
            continue
        out.append({"model": h.model, "worker": h.worker,
                    "alive": age_ms < STALE_INTERVALS * h.interval_s * 1000,
                    "age_s": round(max(0, age_ms) / 1000, 1), "ts_ms": h.ts_ms, "interval_s": h.interval_s,
                    "in_flight": h.in_flight, "capacity": h.capacity, "backlog": h.backlog,
                    "kv_usage": h.kv_usage, "p95_latency_ms": h.p95_latency_ms,
                    "requests": h.requests, "errors": h.errors})
    return sorted(out, key=lambda w: (not w["alive"], w["model"], w["worker"]))


def _connection_failed(bootstrap: str, exc: Exception) -> DependencyUnavailable:
    return DependencyUnavailable(f"the broker at {bootstrap} stopped answering: {exc}")


# ---------------------------------------------------------------------------------------------
# topics describe


def describe_topics(settings: Settings, as_json: bool) -> int:
    from services.cli.policy import bootstrap_of

    bootstrap = bootstrap_of(settings)
    with _quiet():
        topic_list = asyncio.run(_describe(bootstrap, settings.topics))
    if as_json:
        print(json.dumps({"bootstrap": bootstrap, "prefix": settings.topics.prefix, "topics": topic_list}, indent=2))
    else:
        print(f"Topics of {settings.topics.prefix!r} on {bootstrap}:")
        print(render_topics(topic_list, detail=True))
    return 0


async def _describe(bootstrap: str, topics: Topics) -> list[dict]:
    await kafka.wait_for_broker(bootstrap, BROKER_TIMEOUT_S)
    try:
        async with _admin(bootstrap) as admin, _reader(bootstrap) as reader:
            topic_list = await _topics(admin, reader, topics)
            configs = await _configs(admin, [t["name"] for t in topic_list])
    except KafkaError as exc:
        raise _connection_failed(bootstrap, exc) from exc
    return [{"name": t["name"], "partitions": t["partitions"], "replication_factor": t["replication_factor"],
             "config": configs[t["name"]], "records": t["records"]} for t in topic_list]


# ---------------------------------------------------------------------------------------------
# status


def status(settings: Settings, as_json: bool) -> int:
    from services.cli.policy import bootstrap_of

    bootstrap = bootstrap_of(settings)
    with _quiet():
        view = asyncio.run(fleet(bootstrap, settings))
    if as_json:
        print(json.dumps(view, indent=2))
    else:
        print(render_status(view))
    return 0


async def fleet(bootstrap: str, settings: Settings, now_ms: int | None = None) -> dict:
    """One view of the deployment: keys topics, groups, workers, policy (and bootstrap, prefix)."""
    from services.router import feed
    from services.router.policy import load

    topics = settings.topics
    await kafka.wait_for_broker(bootstrap, BROKER_TIMEOUT_S)
    try:
        async with _admin(bootstrap) as admin, _reader(bootstrap) as reader:
            topic_list = await _topics(admin, reader, topics)
            by_name = {t["name"]: t for t in topic_list}
            policy = await feed.in_force(bootstrap, topics) if topics.policies in by_name else None
            models = set(policy.models) if policy else set()
            if policy is None:
                try:  # no live policy: the file's models name the worker groups to look for
                    models = set(load(settings.policy_file).models)
                except SwitchyardError:
                    pass
            model_prefix = topics.model("")
            models |= {t["name"][len(model_prefix):] for t in topic_list if t["name"].startswith(model_prefix)}
            groups = known_groups(topics, models)
            listed = await _list_groups(admin)
            tps = [TopicPartition(t["name"], p) for t in topic_list for p in t["offsets"]]
            group_views = []
            for name in [*groups, *sorted(set(listed or []) - set(groups))]:
                committed = await _committed(admin, name, tps)
                view = group_lag(name, groups.get(name, []), topic_list, committed)
                if name not in groups and not view["partitions"]:
                    continue  # a group of another deployment or application
                described = await _describe_group(admin, name)
                if described:
                    view.update(described)
                group_views.append(view)
            workers = await _workers(reader, by_name.get(topics.health),
                                     int(time.time() * 1000) if now_ms is None else now_ms)
    except KafkaError as exc:
        raise _connection_failed(bootstrap, exc) from exc
    return {
        "bootstrap": bootstrap,
        "prefix": topics.prefix,
        "topics": [{"name": t["name"], "partitions": t["partitions"], "records": t["records"]} for t in topic_list],
        "groups": group_views,
        "groups_listed": listed is not None,
        "workers": workers,
        "policy": ({"applied": True, "version": policy.version, "topic": topics.policies,
                    "routes": sorted(policy.routes), "models": sorted(policy.models)} if policy else
                   {"applied": False, "version": None, "topic": topics.policies,
                    "note": f"no policy applied to {topics.policies}: routers use their policy file"}),
    }


# ---------------------------------------------------------------------------------------------
# rendering


def table(head: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, under a rule: the layout of `switchyard cost`."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def _settings_text(config: Mapping[str, str] | None) -> str:
    if config is None:
        return NOT_REPORTED
    return ", ".join(f"{k}={v}" for k, v in sorted(config.items())) or "-"


def render_topics(topic_list: list[dict], detail: bool = False) -> str:
    if not topic_list:
        return "(no topics with this prefix: `switchyard topics create` makes them)"
    if detail:
        return table(["topic", "partitions", "replicas", "records", "own settings"],
                     [[t["name"], str(t["partitions"]), str(t["replication_factor"]), str(t["records"]),
                       _settings_text(t["config"])] for t in topic_list])
    return table(["topic", "partitions", "records"],
                 [[t["name"], str(t["partitions"]), str(t["records"])] for t in topic_list])


MAX_BEHIND_SHOWN = 6


def _behind_text(parts: list[dict]) -> str:
    """The partitions with records waiting, most first: 'partition:lag', a few of them."""
    behind = sorted((p for p in parts if p["lag"]), key=lambda p: (-p["lag"], p["partition"]))
    text = " ".join(f"{p['partition']}:{p['lag']}" for p in behind[:MAX_BEHIND_SHOWN])
    if len(behind) > MAX_BEHIND_SHOWN:
        text += f" (+{len(behind) - MAX_BEHIND_SHOWN} more)"
    return text or "-"


def render_groups(groups: list[dict], listed: bool = True) -> str:
    """One row per group and topic: committed and end offsets summed over its partitions, the lag,
    and which partitions it is behind on (all of it per partition: --json)."""
    rows = []
    for g in groups:
        state = g["state"] if g["state"] is not None else "?"
        members = "?" if g["members"] is None else str(g["members"])
        for i, topic in enumerate(g["topics"] or ["-"]):
            parts = [p for p in g["partitions"] if p["topic"] == topic]
            committed = [p["committed"] for p in parts if p["committed"] is not None]
            end = str(sum(p["end"] for p in parts)) if parts else "-"
            if g["lag"] is None:
                cells = ["?", end, "?", f"offsets {NOT_REPORTED}"]
            elif not parts:
                cells = ["-", "-", "0", "(no such topic)"]
            else:
                cells = [str(sum(committed)) if committed else "none", end, str(sum(p["lag"] for p in parts)),
                         _behind_text(parts)]
            first = i == 0
            rows.append([g["group"] if first else "", state if first else "", members if first else "", topic, *cells])
    out = [table(["group", "state", "members", "topic", "committed", "end", "lag", "behind on partition:lag"], rows)]
    if any(g["state"] is None for g in groups):
        out.append(f"(? state and members: {NOT_REPORTED})")
    if not listed:
        out.append(f"(other groups: listing groups is {NOT_REPORTED}; only the deployment's own are shown)")
    return "\n".join(out)


def render_workers(workers: list[dict]) -> str:
    if not workers:
        return f"(no health reports in the last {HEALTH_LOOKBACK_S // 60} minutes)"
    rows = [[w["model"], w["worker"], "alive" if w["alive"] else "silent", f"{w['in_flight']}/{w['capacity']}",
             str(w["backlog"]), "-" if w["kv_usage"] is None else f"{w['kv_usage']:.0%}",
             "-" if w["p95_latency_ms"] is None else str(w["p95_latency_ms"]), f"{w['age_s']:.0f}s ago"]
            for w in workers]
    return table(["model", "worker", "state", "in flight", "backlog", "kv cache", "p95 ms", "reported"], rows)


def render_status(view: dict) -> str:
    policy = view["policy"]
    alive = sum(w["alive"] for w in view["workers"])
    lines = [
        f"Fleet {view['prefix']!r} on {view['bootstrap']}",
        (f"Policy: version {policy['version']} in force ({len(policy['routes'])} routes, "
         f"{len(policy['models'])} models; {policy['topic']})" if policy["applied"] else f"Policy: {policy['note']}"),
        "",
        "Topics",
        render_topics(view["topics"]),
        "",
        "Consumer groups",
        render_groups(view["groups"], view.get("groups_listed", True)),
        "",
        f"Workers: {alive} alive (reported within {STALE_INTERVALS} of their intervals), newest report of each "
        f"in the last {HEALTH_LOOKBACK_S // 60} minutes",
        render_workers(view["workers"]),
    ]
    return "\n".join(lines)
