"""`switchyard quality apply|show`: register eval suites on the compacted suites topic, where every
worker and evaluator reads them within seconds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml

from schemas.quality import EvalSuite
from services.cli.policy import bootstrap_of
from shared import feed
from shared.kafka import prepare
from shared.settings import Settings
from shared.suites import load
from shared.topics import suite_key


def apply(settings: Settings, path: Path) -> int:
    suites = load(path)  # refuses an invalid file whole, before anything is sent
    bootstrap = bootstrap_of(settings)
    topics = settings.topics

    async def run() -> None:
        await prepare(bootstrap, [s for s in topics.plan([]) if s.name in (topics.suites, topics.samples, topics.scores)])
        await feed.publish(bootstrap, topics.suites, [(suite_key(s.tenant, s.route), s) for s in suites.suites])

    asyncio.run(run())
    for suite in suites.suites:
        print(f"applied suite {suite.key} version {suite.version}: {len(suite.checks)} checks, "
              f"sampling {suite.sample_rate:.1%} of answers")
    print(f"to {topics.suites}; workers and evaluators switch within seconds")
    return 0


async def in_force(bootstrap: str, settings: Settings) -> list[EvalSuite]:
    suites = feed.CompactedFeed(bootstrap, settings.topics.suites, EvalSuite)
    try:
        return list((await suites.start()).values())
    finally:
        await suites.stop()


def show(settings: Settings, as_json: bool) -> int:
    suites = asyncio.run(in_force(bootstrap_of(settings), settings))
    if not suites:
        print(f"no eval suite applied to {settings.topics.suites}")
        return 1
    data = {"suites": [s.model_dump(mode="json", exclude={"schema_version"}, exclude_none=True) for s in suites]}
    print(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False), end="")
    return 0
