"""The observability assets against the code: the Grafana dashboards, the Prometheus rules and
the runbooks name only metrics and labels the services expose, every PromQL expression parses,
and every alert links a runbook that exists and says what the runbooks must say."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import services.evaluator.metrics  # noqa: F401 - importing registers each module's metrics
import services.router.affinity  # noqa: F401
import services.router.health  # noqa: F401
import services.router.metrics  # noqa: F401
import services.sink.metrics  # noqa: F401
import services.worker.metrics  # noqa: F401
import shared.metrics  # noqa: F401
from services.cli.main import _parser
from services.sink import store
from shared.topics import Topics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RUNBOOK_DIR = ROOT / "docs" / "runbooks"

DASHBOARD_UIDS = {"switchyard-health", "switchyard-cost", "switchyard-quality"}
PANEL_TYPES = {"timeseries", "stat", "bargauge", "table", "text"}
SECTIONS = ["## What it means", "## How to confirm", "## What to do", "## Related"]
SEVERITIES = {"page", "ticket"}
RUNBOOK_URL = re.compile(r"^\{\{ \$externalLabels\.runbook_base \}\}/([a-z0-9]+(?:-[a-z0-9]+)*\.md)$")
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
METRIC_NAME = re.compile(r"switchyard_[a-z0-9_]+")
SCRAPE_LABELS = frozenset({"job", "instance"})  # Prometheus adds them to every scraped series
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
GRAFANA_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)")


def exposed_metrics() -> dict[str, frozenset[str]]:
    """Every switchyard_ sample name the services expose -> its label names. The registry's public
    collect() does not say a metric's label names until it has a child, so this reads them from
    the metric objects registered in it."""
    out: dict[str, frozenset[str]] = {}
    for collector in list(REGISTRY._collector_to_names):
        name, kind = getattr(collector, "_name", ""), getattr(collector, "_type", "")
        if not name.startswith("switchyard_"):
            continue
        labels = frozenset(collector._labelnames)
        if kind == "counter":
            out[f"{name}_total"] = labels  # prometheus-client keeps the name without _total
        elif kind == "gauge":
            out[name] = labels
        elif kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_count"] = out[f"{name}_sum"] = labels
        elif kind == "summary":
            out[name] = labels | {"quantile"}
            out[f"{name}_count"] = out[f"{name}_sum"] = labels
        else:
            raise AssertionError(f"{name}: a {kind} metric is not handled here")
    return out


METRICS = exposed_metrics()
# Prose may name a histogram by its family name; a PromQL expression must name a sample.
FAMILIES = set(METRICS) | {name.removesuffix("_bucket") for name in METRICS if name.endswith("_bucket")}


# ------------------------------------------------------------------------------------- PromQL
class _Scalar:
    def __repr__(self) -> str:
        return "SCALAR"


SCALAR = _Scalar()
ANY = None  # the labels of a metric the code does not define (up, ...): nothing to check them against


class _Walk:
    """Works out the label names each node of a parsed expression yields, and notes every label a
    matcher, by/without, on/ignoring, group_left/right, histogram_quantile or label_replace needs
    that is not there. Returns a frozenset of label names, ANY, or SCALAR."""

    def __init__(self, metrics: dict[str, frozenset[str]]):
        self.metrics = metrics
        self.problems: list[str] = []
        self.selectors: list[tuple[str, list]] = []

    def of(self, node):
        return getattr(self, "_" + type(node).__name__)(node)

    def _VectorSelector(self, node):
        matchers = list(node.matchers.matchers) + [m for group in node.matchers.or_matchers for m in group]
        name = node.name or next((m.value for m in matchers if m.name == "__name__"), None)
        if name is None or name not in self.metrics:
            return ANY  # an unknown switchyard_ name is reported by the name check
        self.selectors.append((name, matchers))
        labels = self.metrics[name] | SCRAPE_LABELS
        for m in matchers:
            if m.name != "__name__" and m.name not in labels:
                self.problems.append(f"{name} has no label {m.name!r} (its labels: {sorted(self.metrics[name])})")
        return labels

    def _MatrixSelector(self, node):
        return self.of(node.vector_selector)

    def _SubqueryExpr(self, node):
        return self.of(node.expr)

    def _ParenExpr(self, node):
        return self.of(node.expr)

    def _UnaryExpr(self, node):
        return self.of(node.expr)

    def _NumberLiteral(self, node):
        return SCALAR

    def _StringLiteral(self, node):
        return SCALAR

    def _need(self, labels, wanted, where: str) -> None:
        if isinstance(labels, frozenset):
            for label in sorted(set(wanted) - labels):
                self.problems.append(f"{where}: {label!r} is not among the labels there {sorted(labels)}")

    def _Call(self, node):
        func = node.func.name
        args = [self.of(arg) for arg in node.args]
        if func == "histogram_quantile":
            self._need(args[1], ["le"], "histogram_quantile")
            return args[1] - {"le"} if isinstance(args[1], frozenset) else args[1]
        if func in ("label_replace", "label_join"):
            dst = node.args[1].val
            sources = [node.args[3].val] if func == "label_replace" else [a.val for a in node.args[3:]]
            self._need(args[0], [s for s in sources if s], func)
            return args[0] | {dst} if isinstance(args[0], frozenset) else args[0]
        if func in ("scalar", "time", "pi"):
            return SCALAR
        if func in ("vector", "absent", "absent_over_time"):
            return frozenset()
        vectors = [a for a in args if a is not SCALAR]
        return vectors[0] if vectors else frozenset()

    def _AggregateExpr(self, node):
        inner = self.of(node.expr)
        if node.param is not None:
            self.of(node.param)
        op, modifier = str(node.op), node.modifier
        if modifier is None:
            grouped = frozenset()
        elif modifier.type == promql_parser.AggModifierType.By:
            self._need(inner, modifier.labels, f"{op} by ({', '.join(modifier.labels)})")
            grouped = frozenset(modifier.labels)
        else:
            grouped = inner - set(modifier.labels) if isinstance(inner, frozenset) else ANY
        if op in ("topk", "bottomk", "limitk", "limit_ratio"):
            return inner
        if op == "count_values":
            return grouped | {node.param.val} if isinstance(grouped, frozenset) else grouped
        return grouped

    def _BinaryExpr(self, node):
        lhs, rhs = self.of(node.lhs), self.of(node.rhs)
        op = str(node.op)
        if lhs is SCALAR or rhs is SCALAR:
            return rhs if lhs is SCALAR else lhs
        modifier = node.modifier
        matching = modifier.matching if modifier is not None else None
        card = modifier.card if modifier is not None else promql_parser.VectorMatchCardinality.OneToOne
        group = list(modifier.group_labels or []) if modifier is not None else []
        known = isinstance(lhs, frozenset) and isinstance(rhs, frozenset)
        on = matching is not None and matching.type == promql_parser.LabelModifierType.Include
        if on:
            self._need(lhs, matching.labels, f"left of {op} on ({', '.join(matching.labels)})")
            self._need(rhs, matching.labels, f"right of {op} on ({', '.join(matching.labels)})")
        elif op != "or" and known:
            # Series match on every label but the ignored ones: the two sides must carry the same.
            ignored = set(matching.labels) if matching is not None else set()
            if lhs - ignored != rhs - ignored:
                self.problems.append(f"the sides of {op} never match: left has {sorted(lhs - ignored)}, "
                                     f"right has {sorted(rhs - ignored)}")
        if op == "or":
            return lhs | rhs if known else ANY
        if op in ("and", "unless"):
            return lhs
        if card == promql_parser.VectorMatchCardinality.ManyToOne:
            self._need(rhs, group, f"group_left ({', '.join(group)})")
            return lhs | set(group) if isinstance(lhs, frozenset) else ANY
        if card == promql_parser.VectorMatchCardinality.OneToMany:
            self._need(lhs, group, f"group_right ({', '.join(group)})")
            return rhs | set(group) if isinstance(rhs, frozenset) else ANY
        if on:
            return frozenset(matching.labels)
        if matching is not None and isinstance(lhs, frozenset):
            return lhs - set(matching.labels)
        return lhs


def as_promql(expr: str) -> str:
    """A Grafana expression with its variables replaced by stand-ins PromQL accepts: durations for
    the interval variables, `__var_<name>__` for the others (they only appear in label values)."""
    def stand_in(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return "5m" if name in GRAFANA_BUILTINS else f"__var_{name}__"
    return GRAFANA_VARIABLE.sub(stand_in, expr)


def analyse(expr: str, metrics: dict[str, frozenset[str]] = METRICS) -> tuple[list[str], list[tuple[str, list]]]:
    """(problems, the selectors of known metrics with their matchers) of one PromQL expression."""
    problems = [f"{name} is not a metric the code exposes"
                for name in sorted(set(METRIC_NAME.findall(expr))) if name not in metrics]
    try:
        tree = promql_parser.parse(expr)
    except ValueError as exc:
        return [*problems, f"does not parse: {exc}"], []
    walk = _Walk(metrics)
    walk.of(tree)
    return problems + walk.problems, walk.selectors


def expr_problems(expr: str, metrics: dict[str, frozenset[str]] = METRICS) -> list[str]:
    return analyse(expr, metrics)[0]


# ------------------------------------------------------------------------------------- dashboards
def _load_dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def _overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def dashboard_problems(board: dict) -> list[str]:
    problems = []
    for key in ("uid", "title", "panels"):
        if not board.get(key):
            problems.append(f"no {key}")
    if problems:
        return problems
    if board["uid"] not in DASHBOARD_UIDS:
        problems.append(f"uid {board['uid']!r} is not one of {sorted(DASHBOARD_UIDS)}")
    if "switchyard" not in board.get("tags", []):
        problems.append("not tagged switchyard")
    if board.get("schemaVersion") != 39 or board.get("time", {}).get("from") != "now-6h" or board.get("refresh") != "30s":
        problems.append("schemaVersion 39, time from now-6h and refresh 30s expected")

    variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    if source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append("no `datasource` variable of type datasource for prometheus")
    route = variables.get("route", {})
    route_query = route.get("query", {})
    route_query = route_query.get("query") if isinstance(route_query, dict) else route_query
    if route_query != "label_values(switchyard_router_requests_total, route)" or not (
            route.get("multi") and route.get("includeAll")):
        problems.append("no multi, includeAll `route` variable from label_values(switchyard_router_requests_total, route)")
    for var in variables.values():
        query = var.get("query", {})
        query = query.get("query", "") if isinstance(query, dict) else query
        found = re.fullmatch(r"label_values\((switchyard_[a-z0-9_]+),\s*(\w+)\)", query or "")
        if found:
            metric, label = found.groups()
            if label not in METRICS.get(metric, ()):
                problems.append(f"variable {var['name']}: {metric} has no label {label!r} or does not exist")
    # A variable named after a label filters every selector of a metric that has that label.
    filters = {name for name in variables if any(name in labels for labels in METRICS.values())}

    ids = [panel.get("id") for panel in board["panels"]]
    if len(ids) != len(set(ids)) or None in ids:
        problems.append(f"panel ids missing or not unique: {ids}")
    for panel in board["panels"]:
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("type") not in PANEL_TYPES or not panel.get("title"):
            problems.append(f"{where}: type must be one of {sorted(PANEL_TYPES)}, with a title")
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"{where}: gridPos needs whole h, w, x, y within 24 columns")
        if panel.get("type") == "text":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where}: data source must be ${{datasource}}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)):
            problems.append(f"{where}: refIds not unique: {refs}")
        for target in targets:
            there = f"{where} target {target.get('refId')}"
            if not (target.get("expr") and target.get("refId") and "legendFormat" in target):
                problems.append(f"{there}: needs expr, refId and legendFormat")
                continue
            for match in GRAFANA_VARIABLE.finditer(target["expr"]):
                name = match.group(1) or match.group(2)
                if name not in variables and name not in GRAFANA_BUILTINS:
                    problems.append(f"{there}: ${name} is not a variable of the dashboard")
            found, selectors = analyse(as_promql(target["expr"]))
            problems += [f"{there}: {p}" for p in found]
            for metric, matchers in selectors:
                for label in filters & METRICS[metric]:
                    if not any(m.name == label and m.op == promql_parser.MatchOp.Re and m.value == f"__var_{label}__"
                               for m in matchers):
                        problems.append(f'{there}: {metric} is not filtered by {label}=~"${label}"')
    grids = [(p.get("id"), p.get("gridPos", {})) for p in board["panels"]]
    for i, (a_id, a) in enumerate(grids):
        for b_id, b in grids[i + 1:]:
            if all(k in a and k in b for k in "hwxy") and _overlap(a, b):
                problems.append(f"panels {a_id} and {b_id} overlap")
    return problems


DASHBOARDS = _load_dashboards()


def test_there_are_three_dashboards_with_their_own_uids():
    assert {board.get("uid") for board in DASHBOARDS.values()} == DASHBOARD_UIDS
    assert len(DASHBOARDS) == len(DASHBOARD_UIDS)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_matches_the_code(name):
    assert dashboard_problems(DASHBOARDS[name]) == []


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    [prometheus] = source["datasources"]
    assert (prometheus["type"], prometheus["uid"], prometheus["url"]) == ("prometheus", "prometheus", "http://prometheus:9090")
    boards = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/switchyard.yaml").read_text())
    [provider] = boards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


# ---------------------------------------------------------------------------------------- rules
def _scrape_jobs() -> set[str]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    return {job["job_name"] for job in config["scrape_configs"]}


def rule_problems(doc: dict, runbooks: set[str], jobs: set[str]) -> list[str]:
    problems = []
    groups = doc.get("groups") or []
    if [g.get("name") for g in groups] != ["switchyard"]:
        problems.append("one rule group, named switchyard, expected")
    for rule in (r for g in groups for r in g.get("rules", [])):
        where = rule.get("alert") or f"a rule without an alert name ({rule.get('expr', '')[:40]!r})"
        labels, notes = rule.get("labels") or {}, rule.get("annotations") or {}
        if not rule.get("alert") or not rule.get("expr"):
            problems.append(f"{where}: needs alert and expr")
            continue
        if not DURATION.match(str(rule.get("for", ""))):
            problems.append(f"{where}: `for` must be a duration, got {rule.get('for')!r}")
        if labels.get("severity") not in SEVERITIES:
            problems.append(f"{where}: severity must be one of {sorted(SEVERITIES)}")
        for key in ("summary", "description", "runbook_url"):
            if not notes.get(key):
                problems.append(f"{where}: no annotations.{key}")
        if notes.get("description") and not re.search(r"\$labels\.|\$value", notes["description"]):
            problems.append(f"{where}: the description should say which series and value ($labels, $value)")
        link = RUNBOOK_URL.match(notes.get("runbook_url", ""))
        if not link:
            problems.append(f"{where}: runbook_url must be {{{{ $externalLabels.runbook_base }}}}/<file>.md")
        elif link.group(1) not in runbooks:
            problems.append(f"{where}: runbook {link.group(1)} is not in docs/runbooks")
        problems += [f"{where}: {p}" for p in expr_problems(rule["expr"])]
        for job in re.findall(r'\bjob=~?"([^"]+)"', rule["expr"]):
            for name in job.split("|"):
                if name not in jobs:
                    problems.append(f"{where}: job {name!r} is not scraped in prometheus.yml")
    return problems


RULE_DOC = yaml.safe_load(RULES.read_text())
RUNBOOKS = {path.name: path.read_text() for path in sorted(RUNBOOK_DIR.glob("*.md")) if path.name != "README.md"}


def test_every_rule_is_complete_and_matches_the_code():
    assert rule_problems(RULE_DOC, set(RUNBOOKS), _scrape_jobs()) == []


def test_the_alerts_the_platform_relies_on_are_there():
    alerts = {r["alert"] for g in RULE_DOC["groups"] for r in g["rules"]}
    assert alerts >= {"HighErrorRate", "LatencyP95High", "ConsumerLagGrowing", "WorkerSaturated", "SinkBehind",
                      "DeadLettersAppearing", "ModelUnhealthy", "EscalationRateHigh", "SpendAnomaly",
                      "CacheHitRateDropped", "MetricsTargetDown", "RedisUnavailable", "QualityScoreDrift",
                      "QualityDrift"}


def test_prometheus_loads_the_rules_and_knows_the_runbook_base():
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["rules.yml"]
    assert config["global"]["external_labels"]["runbook_base"].endswith("/docs/runbooks")
    assert {"router", "sink", "workers"} <= _scrape_jobs()


# -------------------------------------------------------------------------------------- runbooks
def _topic_names() -> set[str]:
    topics = Topics()
    return {*topics.all_requests, f"{topics.prefix}.requests.<priority>", topics.costs, topics.dead_letter,
            topics.policies, topics.health, topics.escalations, topics.suites, topics.samples, topics.scores}


TOPIC_PATTERNS = [re.compile(re.escape(Topics().model("@")).replace("@", r"[\w<>.-]+") + "$"),
                  re.compile(re.escape(Topics().replies("@")).replace("@", r"[\w<>-]+") + "$")]
CLICKHOUSE_OBJECTS = set(re.findall(r"(?:TABLE|VIEW) IF NOT EXISTS (\w+\.\w+)", " ".join(store.DDL)))
KNOWN_NAMES = _topic_names() | CLICKHOUSE_OBJECTS
SWITCHYARD_NAME = re.compile(r"\bswitchyard\.[\w<>.-]*[\w>]")
COMMAND = re.compile(r"`(switchyard [^`]+)`|^\s*(switchyard [^\n`]+)$", re.MULTILINE)


def _command_problem(command: str) -> str | None:
    try:
        _parser().parse_args(shlex.split(command)[1:])
    except SystemExit:
        return f"`{command}` is not a command services/cli/main.py has"
    return None


def runbook_problems(text: str) -> list[str]:
    headings = re.findall(r"^## .*$", text, re.MULTILINE)
    problems = [] if headings == SECTIONS else [f"sections must be exactly {SECTIONS}, found {headings}"]
    return problems + name_problems(text)


def name_problems(text: str) -> list[str]:
    """Metrics, topics, tables, views and commands a page names that the code does not have."""
    problems = []
    for name in sorted(set(METRIC_NAME.findall(text))):
        if name not in FAMILIES:
            problems.append(f"{name} is not a metric the code exposes")
    for name in sorted(set(SWITCHYARD_NAME.findall(text))):
        if name not in KNOWN_NAMES and not any(p.match(name) for p in TOPIC_PATTERNS):
            problems.append(f"{name} is neither a topic of shared/topics.py nor a table or view of the books")
    for match in COMMAND.finditer(text):
        problem = _command_problem((match.group(1) or match.group(2)).strip())
        if problem:
            problems.append(problem)
    return problems


@pytest.mark.parametrize("name", sorted(RUNBOOKS))
def test_runbook_has_its_sections_and_names_real_things(name):
    assert runbook_problems(RUNBOOKS[name]) == []


def test_every_runbook_is_linked_and_indexed():
    readme = (RUNBOOK_DIR / "README.md").read_text()
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", readme))
    from_alerts = {RUNBOOK_URL.match(r["annotations"]["runbook_url"]).group(1)
                   for g in RULE_DOC["groups"] for r in g["rules"]}
    assert set(RUNBOOKS) - (linked | from_alerts) == set(), "runbooks nothing links to"
    assert set(RUNBOOKS) - linked == set(), "runbooks the README does not index"
    assert linked - set(RUNBOOKS) == set(), "README links to runbooks that do not exist"
    assert name_problems(readme) == []


# ------------------------------------------------------- the checks themselves catch drift
@pytest.mark.parametrize(("expr", "complaint"), [
    ("sum(rate(switchyard_worker_request_total[5m]))", "switchyard_worker_request_total is not a metric"),
    ("sum by (tenant) (rate(switchyard_worker_requests_total[5m]))", "'tenant' is not among the labels"),
    ('switchyard_router_requests_total{outcomes="routed"}', "has no label 'outcomes'"),
    ('switchyard_request_seconds_sum{le="1"}', "has no label 'le'"),
    ("histogram_quantile(0.95, sum by (route) (rate(switchyard_request_seconds_bucket[5m])))", "histogram_quantile"),
    ("sum by (route) (rate(switchyard_worker_requests_total[5m]))"
     " / sum by (route, model) (rate(switchyard_worker_handoffs_total[5m]))", "never match"),
    ("sum by (route) (rate(switchyard_worker_requests_total[5m]))"
     " / on (model) sum by (route) (rate(switchyard_worker_handoffs_total[5m]))", "'model' is not among"),
    ("sum by (route, outcome) (rate(switchyard_worker_requests_total[5m])) / ignoring (outcome) group_left (tier)"
     " sum by (route) (rate(switchyard_worker_requests_total[5m]))", "group_left (tier)"),
    ('label_replace(sum(switchyard_consumer_lag_records), "g", "$1", "group", "(.*)")', "label_replace"),
    ("sum by (model) (rate(switchyard_booked_tokens_total[5m]))", "'model' is not among"),
    ("sum(rate(switchyard_router_requests_total[5m])", "does not parse"),
])
def test_the_expression_check_catches_drift(expr, complaint):
    problems = expr_problems(expr)
    assert any(complaint in p for p in problems), problems


@pytest.mark.parametrize("expr", [
    'up{job=~"router|sink|workers"} == 0',
    "sum by (route, cache_hit) (rate(switchyard_booked_requests_total[5m])) / ignoring (cache_hit) group_left"
    " sum by (route) (rate(switchyard_booked_requests_total[5m]))",
    'label_replace(sum(switchyard_consumer_lag_records{group="sink"}) > 1, "cause", "lag", "", "")',
    "switchyard_dead_letters_total unless switchyard_dead_letters_total offset 10m",
])
def test_the_expression_check_accepts_sound_expressions(expr):
    assert expr_problems(expr) == []


def test_the_dashboard_check_catches_drift():
    board = copy.deepcopy(DASHBOARDS["health.json"])
    board["panels"][1]["id"] = board["panels"][0]["id"]
    target = next(p for p in board["panels"] if "route=~" in json.dumps(p.get("targets")))["targets"][0]
    target["expr"] = target["expr"].replace('route=~"$route"', 'route=~".*"').replace(
        "switchyard_", "switchyard_old_", 1)
    del board["panels"][2]["targets"][0]["refId"]
    problems = "\n".join(dashboard_problems(board))
    assert "not unique" in problems
    assert "switchyard_old_" in problems and "is not a metric the code exposes" in problems
    assert "needs expr, refId and legendFormat" in problems
    unfiltered = copy.deepcopy(DASHBOARDS["quality.json"])
    unfiltered["panels"][4]["targets"][0]["expr"] = "sum(rate(switchyard_worker_requests_total[5m]))"
    assert any('not filtered by route=~"$route"' in p for p in dashboard_problems(unfiltered))


def test_the_rule_check_catches_drift():
    doc = copy.deepcopy(RULE_DOC)
    rules = doc["groups"][0]["rules"]
    rules[0]["annotations"]["runbook_url"] = "{{ $externalLabels.runbook_base }}/no-such-page.md"
    rules[1]["expr"] = rules[1]["expr"].replace("route", "tenant")
    del rules[2]["for"]
    rules[3]["labels"]["severity"] = "critical"
    rules[-1]["expr"] = 'up{job="routers"} == 0'
    problems = "\n".join(rule_problems(doc, set(RUNBOOKS), _scrape_jobs()))
    for complaint in ("no-such-page.md is not in docs/runbooks", "'tenant' is not among the labels",
                      "`for` must be a duration", "severity must be one of", "job 'routers' is not scraped"):
        assert complaint in problems


def test_the_runbook_check_catches_drift():
    text = RUNBOOKS["dead-letters-appearing.md"]
    broken = (text.replace("## How to confirm", "## Confirming")
              .replace("switchyard.dead-letter", "switchyard.dlq")
              .replace("switchyard_dead_letters_total", "switchyard_dead_letter_total")
              + "\nRun `switchyard replay --topic switchyard.dead-letter`.\n")
    problems = "\n".join(runbook_problems(broken))
    for complaint in ("sections must be exactly", "switchyard.dlq is neither a topic",
                      "switchyard_dead_letter_total is not a metric", "`switchyard replay --topic"):
        assert complaint in problems
