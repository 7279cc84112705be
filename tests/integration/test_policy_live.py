"""A policy applied with `switchyard policy apply` reaches a running router within seconds, no restart."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from schemas import Status
from tests.integration.conftest import POLICY, ROOT

pytestmark = pytest.mark.integration


def switchyard(args: list[str], broker: str, prefix: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SWITCHYARD_BOOTSTRAP=broker, SWITCHYARD_TOPIC_PREFIX=prefix)
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


async def test_apply_changes_a_running_router_within_5_s_and_show_prints_it(worker, router, client, broker, topics,
                                                                            tmp_path):
    before = await client.complete(tenant="live", route="brand-new", prompt="hello")
    assert before.error.code == "unknown_route"

    changed = tmp_path / "changed.yaml"
    changed.write_text(POLICY.replace('version: "test-1"', 'version: "test-2"')
                       .replace("routes:\n", "routes:\n  brand-new: {models: [small], max_output_tokens: 2}\n"))
    original = tmp_path / "original.yaml"
    original.write_text(POLICY)
    try:
        applied = switchyard(["policy", "apply", str(changed)], broker, topics.prefix)
        assert applied.returncode == 0, applied.stderr
        assert "applied policy version test-2" in applied.stdout

        deadline = asyncio.get_running_loop().time() + 5
        while router.policies.version != "test-2":
            assert asyncio.get_running_loop().time() < deadline, "the router did not pick the policy up in 5 s"
            await asyncio.sleep(0.1)
        after = await client.complete(tenant="live", route="brand-new", prompt="hello", max_tokens=50)
        assert after.status == Status.ok and after.tokens_out <= 2

        shown = switchyard(["policy", "show"], broker, topics.prefix)
        assert shown.returncode == 0 and "version: test-2" in shown.stdout and "brand-new" in shown.stdout
    finally:
        switchyard(["policy", "apply", str(original)], broker, topics.prefix)


async def test_an_invalid_file_is_refused_whole_and_nothing_changes(router, broker, topics, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace('version: "test-1"', 'version: "bad"').replace("max_output_tokens: 4",
                                                                                  "max_output_tokens: 0"))
    refused = switchyard(["policy", "apply", str(bad)], broker, topics.prefix)
    assert refused.returncode == 2
    assert "routes.short.max_output_tokens" in refused.stderr and "nothing applied" in refused.stderr
    await asyncio.sleep(1)
    assert router.policies.version != "bad"
