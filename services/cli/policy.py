"""`switchyard policy apply|show`: change the route policy of every running router without a restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml

from services.router import feed
from services.router.policy import load
from services.stack.supervisor import read_state
from shared.errors import ConfigError
from shared.kafka import prepare
from shared.settings import Settings


def bootstrap_of(settings: Settings) -> str:
    """The configured cluster, or the one a running `switchyard up` on this data folder started."""
    if settings.bootstrap:
        return settings.bootstrap
    state = read_state(settings)
    if state is None:
        raise ConfigError("set SWITCHYARD_BOOTSTRAP, or start the local stack with `switchyard up`")
    return state["bootstrap"]


def apply(settings: Settings, path: Path) -> int:
    policies = load(path)  # refuses an invalid file whole, before anything is sent
    bootstrap = bootstrap_of(settings)

    async def run() -> None:
        await prepare(bootstrap, [s for s in settings.topics.plan([]) if s.name == settings.topics.policies])
        await feed.publish(bootstrap, settings.topics, policies)

    asyncio.run(run())
    print(f"applied policy version {policies.version} ({len(policies.routes)} routes, {len(policies.models)} models) "
          f"to {settings.topics.policies}; routers switch within seconds")
    return 0


def show(settings: Settings, as_json: bool) -> int:
    policies = asyncio.run(feed.in_force(bootstrap_of(settings), settings.topics))
    if policies is None:
        print(f"no policy applied to {settings.topics.policies}; routers use their policy file")
        return 1
    data = policies.model_dump(mode="json")
    print(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False), end="")
    return 0
