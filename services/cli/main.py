"""The `switchyard` command: run the stack or one service, make a tiny model, run the demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shared import lifecycle, log
from shared.errors import ConfigError, SwitchyardError
from shared.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole platform locally (broker, Redis, chDB, router, workers, sink)")
    up.add_argument("--models", help="comma-separated models to serve (default: every model in the policy)")

    router = sub.add_parser("router", help="run a router (joins consumer group 'router'); `router train` fits its classifier")
    router_sub = router.add_subparsers(dest="router_command")
    train = router_sub.add_parser("train", help="fit the classifier from labeled prompts (JSON lines)")
    train.add_argument("file", type=Path, nargs="?", help="labeled prompts (default: the bundled set)")
    train.add_argument("--out", type=Path, help="where to write it (default: $SWITCHYARD_CLASSIFIER or .switchyard/classifier.json)")
    train.add_argument("--target-recall", type=float, default=0.97, help="share of hard prompts to send to the hard tier")
    train.add_argument("--history", action="store_true",
                       help="also learn from the workers' confidence checks on the escalations topic")
    train.add_argument("--eval", type=Path, help="a second labeled file to report on (default with the bundled set: its eval file)")
    worker = sub.add_parser("worker", help="run a worker for one model, on vLLM or its provider API (joins group 'worker.<model>')")
    worker.add_argument("--model", required=True)
    worker.add_argument("--model-path", type=Path, help="weights folder (default: <data dir>/models/<model>)")
    worker.add_argument("--max-in-flight", type=int, default=64)
    sub.add_parser("sink", help="run the sink: cost records and quality scores into ClickHouse (joins group 'sink')")
    sub.add_parser("evaluator", help="score sampled answers against their eval suites, watch for drift (group 'evaluator')")

    quality = sub.add_parser("quality", help="quality scores and drift from the books; `quality apply|show`: eval suites")
    quality.add_argument("--by", default="route,model", help="comma-separated: tenant, route, model, hour (default route,model)")
    quality.add_argument("--since", default="24h", help="a span back from now (90m, 24h, 7d) or an ISO date/time")
    quality.add_argument("--until", help="the same forms; default now")
    quality.add_argument("--tenant", help="only this tenant")
    quality.add_argument("--route", help="only this route")
    quality.add_argument("--json", action="store_true", help="as JSON instead of tables")
    quality_sub = quality.add_subparsers(dest="quality_command")
    quality_apply = quality_sub.add_parser("apply", help="validate FILE whole and register its eval suites")
    quality_apply.add_argument("file", type=Path)
    quality_show = quality_sub.add_parser("show", help="print the eval suites in force")
    quality_show.add_argument("--json", action="store_true", help="as JSON instead of YAML")

    policy = sub.add_parser("policy", help="the live route policy")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    apply = policy_sub.add_parser("apply", help="validate FILE whole and make it the policy of every router")
    apply.add_argument("file", type=Path)
    show = policy_sub.add_parser("show", help="print the policy in force")
    show.add_argument("--json", action="store_true", help="as JSON instead of YAML")

    topics = sub.add_parser("topics", help="topic utilities")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True)
    create = topics_sub.add_parser("create", help="create every topic the policy's models need, with partition counts")
    create.add_argument("--models", help="comma-separated models (default: every model in the policy)")
    create.add_argument("--partitions", help=("partition counts by priority or model, e.g. "
                                              "interactive=12,batch=3,small=24 (defaults: see docs/operations.md)"))
    create.add_argument("--reply-to", action="append", metavar="NAME",
                        help="also the reply topic of this reply_to (repeatable), for producers that cannot create it")
    describe = topics_sub.add_parser("describe", help="every topic of this deployment: partitions, config, records")
    describe.add_argument("--json", action="store_true", help="as JSON instead of a table")

    status = sub.add_parser("status", help="the fleet: topics, consumer groups and their lag, workers and their load, policy")
    status.add_argument("--json", action="store_true", help="as JSON instead of tables")

    gateway = sub.add_parser("gateway", help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...)")
    gateway.add_argument("--port", type=int, help="default $SWITCHYARD_GATEWAY_PORT or 8080")
    gateway.add_argument("--host", default="0.0.0.0")

    batch = sub.add_parser("batch", help="batch jobs in the OpenAI Batch file format")
    batch_sub = batch.add_subparsers(dest="batch_command", required=True)
    submit = batch_sub.add_parser("submit", help="run every line of FILE at batch priority; resumes if run again")
    submit.add_argument("file", type=Path)
    submit.add_argument("--route", required=True)
    submit.add_argument("--tenant", required=True)
    submit.add_argument("--rate", type=float, default=50.0, help="lines published per second at most (default 50)")
    submit.add_argument("--max-in-flight", type=int, default=500, help="lines published but not answered, at most")
    submit.add_argument("--output", type=Path, help="results file (default: FILE with .output.jsonl)")
    submit.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the last answers")
    batch_status = batch_sub.add_parser("status", help="a job's progress, from any machine that reaches the broker")
    batch_status.add_argument("id")
    batch_status.add_argument("--json", action="store_true")

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("tiny", help="generate a tiny Llama-style model and tokenizer (random weights)")
    tiny.add_argument("path", type=Path)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=128, help="hidden size, a multiple of 64")
    tiny.add_argument("--seed", type=int, default=0)

    cost = sub.add_parser("cost", help="what tenants, routes and models cost, from the books in ClickHouse")
    cost.add_argument("--by", default="tenant", help="comma-separated: tenant, route, model, hour (default tenant)")
    cost.add_argument("--since", default="24h", help="a span back from now (90m, 24h, 7d, 2w) or an ISO date/time")
    cost.add_argument("--until", help="the same forms; default now")
    cost.add_argument("--tenant", help="only this tenant")
    cost.add_argument("--route", help="only this route")
    cost.add_argument("--versus", help="the model to price the same tokens at (default: the dearest of the hard tier)")
    cost.add_argument("--json", action="store_true", help="as JSON instead of a table")
    chaos = sub.add_parser("chaos", help="fault drills on a local stack of its own: nothing lost, nothing billed twice")
    chaos.add_argument("--scenarios", default="all", help="comma-separated, or all (default): steady, worker-kill, "
                       "router-kill, sink-kill, redis-stop, broker-restart, provider-faults, poison-burst")
    chaos.add_argument("--rate", type=float, default=4.0, help="requests per second of the steady load (default 4)")
    chaos.add_argument("--redis-down-s", type=float, default=30.0, help="how long Redis stays stopped (default 30)")
    chaos.add_argument("--out", type=Path, default=Path("bench-results/chaos.json"), help="where the JSON goes")
    demo = sub.add_parser("demo", help="run the local stack, send requests for three tenants, print what they cost")
    demo.add_argument("--requests", type=int, default=300)
    demo.add_argument("--concurrency", type=int, default=48)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "up":
            from services.stack.supervisor import up

            log.setup("stack")
            return up(settings, args.models.split(",") if args.models else None)
        if args.command == "router" and args.router_command == "train":
            from services.cli.policy import bootstrap_of
            from services.router import train

            path = args.file or train.BUNDLED
            evaluate = args.eval or (train.BUNDLED_EVAL if args.file is None else None)
            # --history reads the escalations topic: of SWITCHYARD_BOOTSTRAP, or of the running stack.
            bootstrap = bootstrap_of(settings) if args.history else None
            return train.main(path, args.out or settings.classifier_path, args.target_recall, evaluate,
                              bootstrap=bootstrap, topics=settings.topics)
        if args.command == "router":
            from services.router.main import serve

            log.setup("router")
            lifecycle.run(lambda stop: serve(settings, stop))
        elif args.command == "worker":
            from services.worker.main import serve

            log.setup(f"worker.{args.model}")
            lifecycle.run(lambda stop: serve(settings, stop, model=args.model, model_path=args.model_path,
                                             max_in_flight=args.max_in_flight))
        elif args.command == "sink":
            from services.sink.main import serve

            log.setup("sink")
            lifecycle.run(lambda stop: serve(settings, stop))
        elif args.command == "evaluator":
            from services.evaluator.main import serve

            log.setup("evaluator")
            lifecycle.run(lambda stop: serve(settings, stop))
        elif args.command == "quality":
            from services.cli import quality

            if args.quality_command == "apply":
                return quality.apply(settings, args.file)
            if args.quality_command == "show":
                return quality.show(settings, args.json)
            from services.cli.quality_report import main as report

            return report(settings, by=args.by, since=args.since, until=args.until, tenant=args.tenant,
                          route=args.route, as_json=args.json)
        elif args.command == "policy":
            from services.cli.policy import apply, show

            return apply(settings, args.file) if args.policy_command == "apply" else show(settings, args.json)
        elif args.command == "topics":
            from services.cli import fleet

            if args.topics_command == "describe":
                return fleet.describe_topics(settings, args.json)
            return fleet.create_topics(settings, args.models.split(",") if args.models else None, args.partitions,
                                       args.reply_to)
        elif args.command == "status":
            from services.cli import fleet

            return fleet.status(settings, args.json)
        elif args.command == "gateway":
            from services.gateway.main import serve

            log.setup("gateway")
            lifecycle.run(lambda stop: serve(settings, stop, port=args.port, host=args.host))
        elif args.command == "batch":
            from services.cli import batch

            if args.batch_command == "status":
                return batch.status(settings, args.id, args.json)
            return batch.submit(settings, args.file, route=args.route, tenant=args.tenant, rate=args.rate,
                                max_in_flight=args.max_in_flight, output=args.output, timeout_s=args.timeout)
        elif args.command == "model":
            from services.worker.tiny_model import generate

            path = generate(args.path, layers=args.layers, hidden=args.hidden, seed=args.seed)
            print(f"tiny model written to {path}")
        elif args.command == "cost":
            from services.cli.cost import main as cost

            return cost(settings, by=args.by, since=args.since, until=args.until, tenant=args.tenant,
                        route=args.route, versus=args.versus, as_json=args.json)
        elif args.command == "chaos":
            from services.chaos.main import main as chaos
            from services.chaos.scenarios import Drill

            log.setup("chaos", "WARNING")
            # The drill's clients see the faults it injects; what they make of them is its table.
            logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
            if args.rate <= 0 or args.redis_down_s < 0:
                raise ConfigError("--rate must be above 0 and --redis-down-s at least 0")
            return chaos(settings.data_dir / "chaos", args.scenarios, args.rate, Drill(redis_down_s=args.redis_down_s),
                         args.out)
        elif args.command == "demo":
            from services.cli.demo import demo

            log.setup("demo", "WARNING")
            return demo(settings, requests=args.requests, concurrency=args.concurrency)
    except SwitchyardError as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
