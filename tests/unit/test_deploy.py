"""The deployment files against the code: the Kubernetes manifests in deploy/k8s and compose.yaml
run only commands the CLI accepts, set only SWITCHYARD_ variables the code reads, mount the files
those variables name, and give every model of deploy/policy.yaml a worker and a KEDA ScaledObject
on the consumer group and topic the code uses, within the topic's partitions. Each check is also
shown failing on a broken copy, so a pass means something."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from schemas.request import Priority
from services.cli.main import _parser
from shared.topics import MODEL_PARTITIONS, REQUEST_PARTITIONS, Topics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "compose.yaml"
POLICY = ROOT / "deploy" / "policy.yaml"

METRICS_PORT = 9400
GATEWAY_PORT = 8080
GRACE_S = 90  # workers drain on SIGTERM: finish what is in flight, commit, stop the engine
MODELS_DIR = "/var/lib/switchyard/models"
COMMON_ENV = {"SWITCHYARD_BOOTSTRAP": None, "SWITCHYARD_REDIS_URL": None, "SWITCHYARD_CLICKHOUSE_DSN": None,
              "SWITCHYARD_POLICY": "/etc/switchyard/policy.yaml", "SWITCHYARD_DATA_DIR": "/var/lib/switchyard",
              "SWITCHYARD_METRICS_PORT": str(METRICS_PORT)}
GATEWAY_ENV = {"SWITCHYARD_GATEWAY_KEYS": "/etc/switchyard/gateway-keys.yaml",
               "SWITCHYARD_GATEWAY_PORT": str(GATEWAY_PORT)}
FILE_VARS = ("SWITCHYARD_POLICY", "SWITCHYARD_GATEWAY_KEYS")  # must be mounted where they point
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# ------------------------------------------------------------------------------------- loading
def load_dir(directory: Path) -> list[dict]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc = dict(doc)
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


DOCS = load_dir(K8S)
KUSTOMIZATION = next(d for d in DOCS if d.get("kind") == "Kustomization")
MANIFESTS = [d for d in DOCS if d.get("kind") != "Kustomization"]
COMPOSE_DOC = yaml.safe_load(COMPOSE.read_text())
POLICY_DOC = yaml.safe_load(POLICY.read_text())


def code_reads() -> set[str]:
    """Every SWITCHYARD_ name written as a string literal in shared/ and services/."""
    names: set[str] = set()
    for folder in ("shared", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"""["'](SWITCHYARD_[A-Z0-9_]+)["']""", path.read_text()))
    return names


READ = code_reads()


def named(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d.get("kind") in WORKLOADS]


def generated(kustomization: dict, key: str) -> set[str]:
    return {g["name"] for g in kustomization.get(key) or []}


def env_of(container: dict, docs: list[dict]) -> dict[str, str | None]:
    """Name -> literal value (None when it comes from a Secret or ConfigMap key) of a container's
    environment, envFrom ConfigMaps in `docs` included (a ConfigMap not in `docs` adds nothing)."""
    env: dict[str, str | None] = {}
    maps = named(docs, "ConfigMap")
    for source in container.get("envFrom") or []:
        ref = (source.get("configMapRef") or {}).get("name")
        # A generated ConfigMap carries a hash suffix once built.
        match = next((m for name, m in maps.items() if ref and re.fullmatch(re.escape(ref) + r"(-\w+)?", name)), None)
        for key, value in ((match or {}).get("data") or {}).items():
            env[source.get("prefix", "") + key] = str(value)
    for item in container.get("env") or []:
        env[item["name"]] = str(item["value"]) if "value" in item else None
    return env


# --------------------------------------------------------------------------------------- checks
def kustomization_problems(kustomization: dict, base: Path) -> list[str]:
    problems = []
    for resource in kustomization.get("resources") or []:
        if not (base / resource).exists():
            problems.append(f"resource {resource} does not exist")
    for key in ("configMapGenerator", "secretGenerator"):
        for gen in kustomization.get(key) or []:
            for entry in [*(gen.get("files") or []), *(gen.get("envs") or [])]:
                path = entry.split("=", 1)[-1]
                if not (base / path).is_file():
                    problems.append(f"{key} {gen['name']}: file {path} does not exist")
    return problems


def parse_problem(args: list[str]) -> str | None:
    """None when the CLI accepts `args`, else what argparse said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args([str(a) for a in args])
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "rejected"
    return None


def mounted(container: dict, path: str) -> bool:
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
               for m in container.get("volumeMounts") or [])


def manifest_problems(docs: list[dict], kustomization: dict) -> list[str]:
    """Per workload: args the CLI accepts, the common environment (and the gateway's), only
    SWITCHYARD_ names the code reads, files mounted where the variables point, references to
    ConfigMaps and Secrets that exist, metrics port and scrape annotations on long-running pods."""
    problems = []
    maps = set(named(docs, "ConfigMap")) | generated(kustomization, "configMapGenerator")
    secrets = set(named(docs, "Secret")) | generated(kustomization, "secretGenerator")
    for doc in workloads(docs):
        name, spec = doc["metadata"]["name"], pod_spec(doc)
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for c in spec["containers"]:
            where = f"{doc['kind']} {name}/{c['name']}"
            if (problem := parse_problem(c.get("args") or [])) is not None:
                problems.append(f"{where}: args {c.get('args')} do not parse: {problem}")
            env = env_of(c, docs)
            wanted = dict(COMMON_ENV, **(GATEWAY_ENV if (c.get("args") or [""])[0] == "gateway" else {}))
            for var, value in wanted.items():
                if var not in env:
                    problems.append(f"{where}: {var} is not set")
                elif value is not None and env[var] != value:
                    problems.append(f"{where}: {var} is {env[var]!r}, expected {value!r}")
            for var in sorted(v for v in env if v.startswith("SWITCHYARD_") and v not in READ):
                problems.append(f"{where}: sets {var}, which no code under shared/ or services/ reads")
            for var in FILE_VARS:
                if env.get(var) and not mounted(c, env[var]):
                    problems.append(f"{where}: {var}={env[var]} is not mounted")
            for mount in c.get("volumeMounts") or []:
                if mount["name"] not in volumes:
                    problems.append(f"{where}: mounts volume {mount['name']}, which the pod does not have")
            refs = [(s.get("configMapRef") or {}).get("name") for s in c.get("envFrom") or []]
            for ref in filter(None, refs):
                if ref not in maps:
                    problems.append(f"{where}: envFrom ConfigMap {ref} is not defined")
            for item in c.get("env") or []:
                key_ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                if key_ref and key_ref["name"] not in secrets:
                    problems.append(f"{where}: {item['name']} from Secret {key_ref['name']}, which is not defined")
            if doc["kind"] != "Job":
                ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
                if ports.get("metrics") != METRICS_PORT:
                    problems.append(f"{where}: no containerPort named metrics on {METRICS_PORT}")
        for vol in volumes.values():
            if "configMap" in vol and vol["configMap"]["name"] not in maps:
                problems.append(f"{doc['kind']} {name}: volume {vol['name']} names ConfigMap "
                                f"{vol['configMap']['name']}, which is not defined")
            if "secret" in vol and vol["secret"]["secretName"] not in secrets:
                problems.append(f"{doc['kind']} {name}: volume {vol['name']} names Secret "
                                f"{vol['secret']['secretName']}, which is not defined")
        notes = doc["spec"]["template"].get("metadata", {}).get("annotations") or {}
        if doc["kind"] != "Job" and (notes.get("prometheus.io/scrape") != "true"
                                     or notes.get("prometheus.io/port") != str(METRICS_PORT)):
            problems.append(f"{doc['kind']} {name}: no prometheus.io/scrape and port {METRICS_PORT} annotations")
    return problems


def by_command(docs: list[dict], *args: str) -> list[dict]:
    """The Deployments whose (only) container's args start with `args`."""
    return [d for d in named(docs, "Deployment").values()
            if [str(a) for a in (pod_spec(d)["containers"][0].get("args") or [])][:len(args)] == list(args)]


def model_of(deployment: dict) -> str | None:
    args = [str(a) for a in pod_spec(deployment)["containers"][0].get("args") or []]
    return args[args.index("--model") + 1] if "--model" in args and args.index("--model") + 1 < len(args) else None


def kafka_triggers(scaled: dict) -> list[dict]:
    return [t.get("metadata") or {} for t in scaled["spec"].get("triggers") or [] if t.get("type") == "kafka"]


def scaler_problems(scaled: dict, target: dict, docs: list[dict], want: set[tuple[str, str]],
                    partitions: int) -> list[str]:
    """A ScaledObject that scales `target` on exactly the (group, topic) pairs in `want`, reaches
    the broker the target's container uses, and asks for no more pods than there are partitions."""
    where = f"ScaledObject {scaled['metadata']['name']}"
    spec, problems = scaled["spec"], []
    if spec["scaleTargetRef"]["name"] != target["metadata"]["name"]:
        problems.append(f"{where}: scales {spec['scaleTargetRef']['name']}, not {target['metadata']['name']}")
    triggers = kafka_triggers(scaled)
    have = {(t.get("consumerGroup"), t.get("topic")) for t in triggers}
    if have != want:
        problems.append(f"{where}: triggers on {sorted(have)}, expected {sorted(want)}")
    env = env_of(pod_spec(target)["containers"][0], docs)
    for t in triggers:
        if t.get("bootstrapServersFromEnv"):
            if t["bootstrapServersFromEnv"] not in env:
                problems.append(f"{where}: bootstrapServersFromEnv {t['bootstrapServersFromEnv']} is not in the "
                                "target's environment")
        elif not t.get("bootstrapServers"):
            problems.append(f"{where}: a trigger without bootstrapServers")
        if not str(t.get("lagThreshold", "")).isdigit():
            problems.append(f"{where}: lagThreshold must be a whole number as a string, got {t.get('lagThreshold')!r}")
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not 1 <= low <= high:
        problems.append(f"{where}: replicas {low}..{high}: at least one pod must stay")
    if high > partitions:
        problems.append(f"{where}: maxReplicaCount {high} > {partitions} partitions; the extra consumers sit idle")
    return problems


def fleet_problems(docs: list[dict], policy: dict, topics: Topics = Topics()) -> list[str]:
    """One worker Deployment and ScaledObject per model of the policy, GPU and weights for vLLM
    models, the provider's key from a Secret otherwise; the router scaled on every priority."""
    problems = []
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in named(docs, "ScaledObject").values()}
    workers = {model_of(d): d for d in by_command(docs, "worker")}
    for model, spec in (policy.get("models") or {}).items():
        deployment = workers.get(model)
        if deployment is None:
            problems.append(f"model {model}: no worker Deployment runs `worker --model {model}`")
            continue
        name = deployment["metadata"]["name"]
        pod = pod_spec(deployment)
        container = pod["containers"][0]
        if pod.get("terminationGracePeriodSeconds", 30) < GRACE_S:
            problems.append(f"{name}: terminationGracePeriodSeconds < {GRACE_S}: workers drain on SIGTERM")
        gpus = str((container.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
        provider = spec.get("provider")
        if provider is None:
            if gpus != "1":
                problems.append(f"{name}: a vLLM model needs limits nvidia.com/gpu: 1, has {gpus}")
            if not mounted(container, f"{MODELS_DIR}/{model}"):
                problems.append(f"{name}: no weights mounted at {MODELS_DIR}/{model}")
        else:
            if gpus != "0":
                problems.append(f"{name}: a provider model ({provider.get('api')}) needs no GPU")
            key_env = provider.get("api_key_env")
            item = next((e for e in container.get("env") or [] if e["name"] == key_env), None) if key_env else None
            if key_env and not (item and (item.get("valueFrom") or {}).get("secretKeyRef")):
                problems.append(f"{name}: {key_env} (the policy's api_key_env) must come from a Secret")
        if name not in scaled:
            problems.append(f"model {model}: no ScaledObject scales {name}")
        else:
            problems += scaler_problems(scaled[name], deployment, docs, {(f"worker.{model}", topics.model(model))},
                                        MODEL_PARTITIONS)
    for model in set(workers) - set(policy.get("models") or {}):
        problems.append(f"worker for {model!r}, which is not a model of the policy")
    routers = by_command(docs, "router")
    if not routers:
        problems.append("no router Deployment")
    for router in routers:
        name = router["metadata"]["name"]
        if name not in scaled:
            problems.append(f"no ScaledObject scales {name}")
            continue
        want = {(f"router.{p.value}", topics.requests(p)) for p in Priority}
        assert {t for _, t in want} == set(topics.all_requests)
        problems += scaler_problems(scaled[name], router, docs, want, REQUEST_PARTITIONS)
    return problems


def gateway_problems(docs: list[dict]) -> list[str]:
    problems = []
    gateways = by_command(docs, "gateway")
    if not gateways:
        return ["no gateway Deployment"]
    for gateway in gateways:
        name, pod = gateway["metadata"]["name"], pod_spec(gateway)
        container = pod["containers"][0]
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        if GATEWAY_PORT not in ports.values():
            problems.append(f"{name}: no containerPort {GATEWAY_PORT}")
        probe = (container.get("readinessProbe") or {}).get("httpGet") or {}
        port = ports.get(probe.get("port"), probe.get("port"))
        if probe.get("path") != "/healthz" or port != GATEWAY_PORT:
            problems.append(f"{name}: readiness probe must GET /healthz on {GATEWAY_PORT}")
        labels = gateway["spec"]["template"]["metadata"].get("labels") or {}
        services = [s for s in named(docs, "Service").values()
                    if s["spec"].get("selector") and s["spec"]["selector"].items() <= labels.items()]
        targets = {(p.get("port"), ports.get(p.get("targetPort"), p.get("targetPort")))
                   for s in services for p in s["spec"]["ports"]}
        if (80, GATEWAY_PORT) not in targets:
            problems.append(f"{name}: no Service port 80 -> {GATEWAY_PORT} selects its pods")
    return problems


def compose_problems(compose: dict, base: Path) -> list[str]:
    problems = []
    for name, service in (compose.get("services") or {}).items():
        env = service.get("environment") or {}
        names = env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for var in sorted(v for v in names if v.startswith("SWITCHYARD_") and v not in READ):
            problems.append(f"compose {name}: sets {var}, which no code under shared/ or services/ reads")
        image = service.get("image") or ""
        if image.startswith("switchyard") and (problem := parse_problem(service.get("command") or [])) is not None:
            problems.append(f"compose {name}: command {service.get('command')} does not parse: {problem}")
    gateway = (compose.get("services") or {}).get("gateway")
    if gateway is None:
        return [*problems, "compose: no gateway service"]
    if (gateway.get("command") or [None])[0] != "gateway":
        problems.append(f"compose gateway: command is {gateway.get('command')}, expected ['gateway']")
    keys = (gateway.get("environment") or {}).get("SWITCHYARD_GATEWAY_KEYS")
    mounts = dict(reversed(v.split(":")[:2]) for v in gateway.get("volumes") or [] if ":" in v)
    if not keys:
        problems.append("compose gateway: SWITCHYARD_GATEWAY_KEYS is not set")
    elif keys not in mounts:
        problems.append(f"compose gateway: {keys} is not mounted")
    elif not (base / mounts[keys]).is_file():
        problems.append(f"compose gateway: the keys file {mounts[keys]} does not exist")
    if not any(str(p).endswith(f":{GATEWAY_PORT}") for p in gateway.get("ports") or []):
        problems.append(f"compose gateway: port {GATEWAY_PORT} is not published")
    return problems


# ---------------------------------------------------------------------------------- the real files
def test_every_file_the_kustomization_names_exists():
    assert kustomization_problems(KUSTOMIZATION, K8S) == []
    listed = set(KUSTOMIZATION["resources"])
    assert {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} == listed  # none forgotten
    sources = {f.split("=", 1)[-1] for g in KUSTOMIZATION["configMapGenerator"] for f in g["files"]}
    assert {"../policy.yaml", "../prometheus/rules.yml"} <= sources  # generated, never copied


def test_every_manifest_runs_a_command_the_cli_accepts_with_the_environment_the_code_reads():
    assert {"SWITCHYARD_BOOTSTRAP", "SWITCHYARD_GATEWAY_KEYS"} <= READ  # the grep finds what it should
    assert manifest_problems(MANIFESTS, KUSTOMIZATION) == []
    assert KUSTOMIZATION["namespace"] == "switchyard"
    [env_map] = [d for d in MANIFESTS if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "switchyard-env"]
    assert "SWITCHYARD_BOOTSTRAP" in env_map["data"] and "SWITCHYARD_REDIS_URL" in env_map["data"]


def test_every_model_has_a_worker_and_a_scaler_and_the_router_scales_on_every_priority():
    assert POLICY_DOC["models"]
    assert fleet_problems(MANIFESTS, POLICY_DOC) == []


def test_the_gateway_is_served_and_probed():
    assert gateway_problems(MANIFESTS) == []
    [gateway] = by_command(MANIFESTS, "gateway")
    assert gateway["spec"]["replicas"] >= 2


def test_compose_runs_the_gateway_with_its_keys():
    assert compose_problems(COMPOSE_DOC, ROOT) == []
    keys = yaml.safe_load((ROOT / "deploy" / "gateway-keys.yaml").read_text())
    for entry in keys["keys"]:
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) and entry["name"] and entry["tenant"]
    secret = _find(MANIFESTS, "Secret", "switchyard-gateway-keys")
    assert yaml.safe_load(secret["stringData"]["gateway-keys.yaml"])["keys"]


def test_prometheus_scrapes_the_gateway():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs") or [] for t in sc["targets"]}
    assert f"gateway:{METRICS_PORT}" in targets and "gateway" in COMPOSE_DOC["services"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_it():
    # The generators read ../policy.yaml and ../prometheus/rules.yml: outside the root, which
    # kustomize allows only when told (the docs say to build with the same flag).
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor=LoadRestrictionsNone", str(K8S)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace") == "switchyard" for d in built if d["kind"] != "Namespace")
    maps = named(built, "ConfigMap")
    [policy] = [m for n, m in maps.items() if n.startswith("switchyard-policy-")]
    assert policy["data"]["policy.yaml"] == POLICY.read_text()
    rules = (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    assert maps["switchyard-prometheus-rules"]["data"]["rules.yml"] == rules
    # Names rewritten with the content hash are the ones the pods use.
    built_kustomization = {"configMapGenerator": [], "secretGenerator": []}
    assert manifest_problems(built, built_kustomization) == []
    assert fleet_problems(built, POLICY_DOC) == []


DOCS_WITH_COMMANDS = [ROOT / "docs" / "getting-started.md", ROOT / "docs" / "operations.md"]
INLINE_COMMAND = re.compile(r"`(switchyard [^`]+)`")
BLOCK_COMMAND = re.compile(r"^\s*(switchyard [^\n]+?)\s*(?:#.*)?$", re.MULTILINE)


def doc_command_problems(text: str) -> list[str]:
    """Every `switchyard ...` command a doc shows, inline or at the start of a code-block line,
    parsed by the CLI."""
    problems = []
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL))
    for command in {*INLINE_COMMAND.findall(text), *BLOCK_COMMAND.findall(blocks)}:
        if (problem := parse_problem(shlex.split(command)[1:])) is not None:
            problems.append(f"`{command}`: {problem}")
    return problems


def test_the_commands_the_docs_show_parse():
    for doc in DOCS_WITH_COMMANDS:
        assert doc_command_problems(doc.read_text()) == [], doc.name
    assert "switchyard batch status <id>" in DOCS_WITH_COMMANDS[0].read_text()


# ------------------------------------------------------------------------- the checks can fail
def _find(docs: list[dict], kind: str, name: str) -> dict:
    return named(docs, kind)[name]


def _container(docs: list[dict], name: str) -> dict:
    return pod_spec(_find(docs, "Deployment", name))["containers"][0]


def test_a_missing_resource_or_generator_file_is_found():
    broken = copy.deepcopy(KUSTOMIZATION)
    broken["resources"].append("worker-huge.yaml")
    broken["configMapGenerator"][0]["files"] = ["policy.yaml=../nowhere/policy.yaml"]
    problems = kustomization_problems(broken, K8S)
    assert any("worker-huge.yaml does not exist" in p for p in problems)
    assert any("../nowhere/policy.yaml does not exist" in p for p in problems)


@pytest.mark.parametrize("args", [["worker"], ["routr"], ["topics"], ["worker", "--model", "small", "--gpus", "2"]])
def test_args_the_cli_refuses_are_found(args):
    docs = copy.deepcopy(MANIFESTS)
    _container(docs, "switchyard-sink")["args"] = args
    problems = manifest_problems(docs, KUSTOMIZATION)
    assert any("switchyard-sink/sink: args" in p and "do not parse" in p for p in problems), problems


def test_an_environment_the_code_does_not_read_or_lacks_is_found():
    docs = copy.deepcopy(MANIFESTS)
    router = _container(docs, "switchyard-router")
    router["env"].append({"name": "SWITCHYARD_BOOTSTRAP_SERVERS", "value": "kafka:9092"})  # a typo'd name
    gateway = _container(docs, "switchyard-gateway")
    gateway["env"] = [e for e in gateway["env"] if e["name"] != "SWITCHYARD_GATEWAY_KEYS"]
    env_map = _find(docs, "ConfigMap", "switchyard-env")
    env_map["data"]["SWITCHYARD_METRICS_PORT"] = "9500"
    problems = manifest_problems(docs, KUSTOMIZATION)
    assert any("sets SWITCHYARD_BOOTSTRAP_SERVERS, which no code" in p for p in problems)
    assert any("switchyard-gateway/gateway: SWITCHYARD_GATEWAY_KEYS is not set" in p for p in problems)
    assert any("SWITCHYARD_METRICS_PORT is '9500'" in p for p in problems)


def test_unmounted_files_and_undefined_references_are_found():
    docs = copy.deepcopy(MANIFESTS)
    gateway = _container(docs, "switchyard-gateway")
    gateway["volumeMounts"] = [m for m in gateway["volumeMounts"] if "gateway-keys" not in m["mountPath"]]
    sink = _container(docs, "switchyard-sink")
    sink["env"][0]["valueFrom"]["secretKeyRef"]["name"] = "clickhouse-credentials"
    pod_spec(_find(docs, "Deployment", "switchyard-router"))["volumes"][0]["configMap"]["name"] = "policy"
    del pod_spec(_find(docs, "Deployment", "switchyard-worker-small"))["volumes"][1]
    problems = manifest_problems(docs, KUSTOMIZATION)
    assert any("SWITCHYARD_GATEWAY_KEYS=/etc/switchyard/gateway-keys.yaml is not mounted" in p for p in problems)
    assert any("from Secret clickhouse-credentials, which is not defined" in p for p in problems)
    assert any("names ConfigMap policy, which is not defined" in p for p in problems)
    assert any("mounts volume models, which the pod does not have" in p for p in problems)


def test_missing_metrics_port_and_scrape_annotations_are_found():
    docs = copy.deepcopy(MANIFESTS)
    _container(docs, "switchyard-sink")["ports"] = []
    del _find(docs, "Deployment", "switchyard-router")["spec"]["template"]["metadata"]["annotations"]
    problems = manifest_problems(docs, KUSTOMIZATION)
    assert any("switchyard-sink/sink: no containerPort named metrics" in p for p in problems)
    assert any("switchyard-router: no prometheus.io/scrape" in p for p in problems)


def test_a_model_without_worker_or_scaler_and_wrong_triggers_are_found():
    policy = copy.deepcopy(POLICY_DOC)
    policy["models"]["medium"] = dict(policy["models"]["small"])
    docs = copy.deepcopy(MANIFESTS)
    small = _find(docs, "ScaledObject", "switchyard-worker-small")
    small["spec"]["triggers"][0]["metadata"]["consumerGroup"] = "worker-small"
    small["spec"]["maxReplicaCount"] = MODEL_PARTITIONS * 2
    large = _find(docs, "ScaledObject", "switchyard-worker-large")
    large["spec"]["triggers"][0]["metadata"]["topic"] = "model.large"
    large["spec"]["triggers"][0]["metadata"]["bootstrapServersFromEnv"] = "KAFKA_BOOTSTRAP"
    router = _find(docs, "ScaledObject", "switchyard-router")
    router["spec"]["triggers"] = router["spec"]["triggers"][:2]
    problems = fleet_problems(docs, policy)
    assert "model medium: no worker Deployment runs `worker --model medium`" in problems
    assert any("switchyard-worker-small: triggers on [('worker-small'" in p for p in problems)
    assert any(f"maxReplicaCount {MODEL_PARTITIONS * 2} > {MODEL_PARTITIONS} partitions" in p for p in problems)
    assert any("switchyard-worker-large: triggers on [('worker.large', 'model.large')]" in p for p in problems)
    assert any("bootstrapServersFromEnv KAFKA_BOOTSTRAP is not in the target's environment" in p for p in problems)
    assert any("ScaledObject switchyard-router: triggers on" in p and "router.batch" in p for p in problems)

    docs = [d for d in copy.deepcopy(MANIFESTS) if d["metadata"]["name"] != "switchyard-worker-large"
            or d["kind"] != "ScaledObject"]
    _find(docs, "ScaledObject", "switchyard-router")["spec"]["maxReplicaCount"] = REQUEST_PARTITIONS + 1
    problems = fleet_problems(docs, POLICY_DOC)
    assert "model large: no ScaledObject scales switchyard-worker-large" in problems
    assert any(f"maxReplicaCount {REQUEST_PARTITIONS + 1} > {REQUEST_PARTITIONS}" in p for p in problems)


def test_gpu_weights_grace_and_provider_keys_are_checked():
    docs = copy.deepcopy(MANIFESTS)
    small = _find(docs, "Deployment", "switchyard-worker-small")
    pod_spec(small)["terminationGracePeriodSeconds"] = 30
    container = pod_spec(small)["containers"][0]
    del container["resources"]["limits"]["nvidia.com/gpu"]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "models"]
    problems = fleet_problems(docs, POLICY_DOC)
    assert "switchyard-worker-small: terminationGracePeriodSeconds < 90: workers drain on SIGTERM" in problems
    assert "switchyard-worker-small: a vLLM model needs limits nvidia.com/gpu: 1, has 0" in problems
    assert f"switchyard-worker-small: no weights mounted at {MODELS_DIR}/small" in problems

    # The large model moved to a provider: its GPU is now wasted and its key must come from a Secret.
    policy = copy.deepcopy(POLICY_DOC)
    policy["models"]["large"]["provider"] = {"api": "anthropic", "base_url": "https://api.anthropic.com/v1",
                                             "model": "claude", "api_key_env": "ANTHROPIC_API_KEY"}
    problems = fleet_problems(copy.deepcopy(MANIFESTS), policy)
    assert "switchyard-worker-large: a provider model (anthropic) needs no GPU" in problems
    assert "switchyard-worker-large: ANTHROPIC_API_KEY (the policy's api_key_env) must come from a Secret" in problems
    docs = copy.deepcopy(MANIFESTS)
    large = pod_spec(_find(docs, "Deployment", "switchyard-worker-large"))["containers"][0]
    del large["resources"]["limits"]["nvidia.com/gpu"]
    large["env"].append({"name": "ANTHROPIC_API_KEY",
                         "valueFrom": {"secretKeyRef": {"name": "provider-keys", "key": "anthropic"}}})
    assert fleet_problems(docs, policy) == []


def test_a_gateway_without_probe_port_or_service_is_found():
    docs = copy.deepcopy(MANIFESTS)
    gateway = _container(docs, "switchyard-gateway")
    gateway["readinessProbe"]["httpGet"]["path"] = "/"
    _find(docs, "Service", "switchyard-gateway")["spec"]["ports"][0]["targetPort"] = 9400
    problems = gateway_problems(docs)
    assert "switchyard-gateway: readiness probe must GET /healthz on 8080" in problems
    assert "switchyard-gateway: no Service port 80 -> 8080 selects its pods" in problems
    assert gateway_problems([d for d in docs if d["metadata"]["name"] != "switchyard-gateway"]) == \
        ["no gateway Deployment"]


def test_compose_without_a_working_gateway_is_found(tmp_path):
    compose = copy.deepcopy(COMPOSE_DOC)
    gateway = compose["services"]["gateway"]
    gateway["volumes"] = [v for v in gateway["volumes"] if "gateway-keys" not in v]
    compose["services"]["router"]["command"] = ["router", "--fast"]
    compose["services"]["sink"]["environment"] = dict(compose["services"]["sink"]["environment"],
                                                      SWITCHYARD_SINK_BATCH="5000")
    problems = compose_problems(compose, ROOT)
    assert "compose gateway: /etc/switchyard/gateway-keys.yaml is not mounted" in problems
    assert any(p.startswith("compose router: command ['router', '--fast'] does not parse") for p in problems)
    assert "compose sink: sets SWITCHYARD_SINK_BATCH, which no code under shared/ or services/ reads" in problems
    # The keys file must exist beside compose.yaml: an empty folder has none.
    assert "compose gateway: the keys file ./deploy/gateway-keys.yaml does not exist" in \
        compose_problems(COMPOSE_DOC, tmp_path)
    del compose["services"]["gateway"]
    assert "compose: no gateway service" in compose_problems(compose, ROOT)


def test_a_doc_command_the_cli_refuses_is_found():
    text = "Run `switchyard policy apply` then\n```sh\nswitchyard worker --modle small   # typo\nswitchyard up\n```\n"
    problems = doc_command_problems(text)
    assert len(problems) == 2 and any("policy apply`" in p for p in problems), problems
    assert any("--modle" in p for p in problems)
