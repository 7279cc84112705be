"""The live policy: published to a compacted topic, read by every router within a second or two.

`switchyard policy apply FILE` validates a file whole and publishes it; each router reads the
topic from the beginning at start (the last record is what is in force) and then follows it,
swapping its policy between batches. A record that is not a valid policy is logged and
ignored: the policy in force stays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from schemas import PolicySet
from shared import feed
from shared.topics import POLICY_KEY, Topics


async def publish(bootstrap: str, topics: Topics, policies: PolicySet) -> None:
    await feed.publish(bootstrap, topics.policies, [(POLICY_KEY, policies)])


class PolicyFeed:
    """Follows the policies topic; `latest` is the newest valid policy read, or None."""

    def __init__(self, bootstrap: str, topics: Topics):
        self._feed = feed.CompactedFeed(bootstrap, topics.policies, PolicySet)

    @property
    def latest(self) -> PolicySet | None:
        return self._feed.values.get(POLICY_KEY)

    async def start(self) -> PolicySet | None:
        """Read the topic up to its end and return the policy in force, or None if none was applied."""
        await self._feed.start()
        return self.latest

    async def follow(self, on_change: Callable[[PolicySet], None], stop: asyncio.Event) -> None:
        await self._feed.follow(lambda _values: self.latest is not None and on_change(self.latest), stop)

    async def stop(self) -> None:
        await self._feed.stop()


async def in_force(bootstrap: str, topics: Topics) -> PolicySet | None:
    """The policy routers are using now, read from the topic."""
    policy_feed = PolicyFeed(bootstrap, topics)
    try:
        return await policy_feed.start()
    finally:
        await policy_feed.stop()
