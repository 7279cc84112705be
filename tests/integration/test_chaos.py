"""`switchyard chaos` as an operator runs it: every scenario on a stack of its own (broker-restart
on a second one, whose broker stores in S3), and every promise held in each (nothing lost, nothing
billed twice, books equal to the answers, recovered without a restart by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.chaos.main import ORDER
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

DRILL_TIMEOUT_S = 1800


@pytest.mark.timeout(DRILL_TIMEOUT_S + 60)
def test_the_drills_keep_their_promises(tmp_path, model_path):
    data = tmp_path / "data"
    (data / "chaos" / "models").mkdir(parents=True)
    (data / "chaos" / "models" / "small").symlink_to(model_path)
    out = tmp_path / "chaos.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
    env.update(SWITCHYARD_DATA_DIR=str(data), VLLM_LOGGING_LEVEL="WARNING")
    try:
        proc = subprocess.run([sys.executable, "-m", "services.cli.main", "chaos", "--scenarios", "all",
                               "--out", str(out)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=DRILL_TIMEOUT_S)
    finally:
        log = data / "chaos" / "logs" / "stack.log"
        if log.exists():
            print(log.read_text(errors="replace")[-6000:])
    print(proc.stdout[-8000:], proc.stderr[-4000:])
    report = json.loads(out.read_text())
    rows = {r["scenario"]: r for r in report["scenarios"]}
    assert sorted(rows) == sorted(ORDER)
    for name, row in rows.items():
        assert row["sent"] >= 10 and row["answered"] == row["sent"], name
        assert (row["lost"], row["conflicting_replies"], row["double_billed"], row["unbilled"]) == (0, 0, 0, 0), name
        assert row["books_equal_results"] and row["books_nano_usd"] > 0, name
        assert row["recovery_s"] is not None, name
        assert row["problems"] == [], (name, row["problems"])
    # Each fault did happen, and was seen where an operator would see it.
    assert rows["worker-kill"]["restarts"]["worker.small"] == 1
    assert rows["router-kill"]["restarts"]["router"] == 1
    assert rows["sink-kill"]["restarts"]["sink"] == 1
    assert rows["redis-stop"]["seen"]["degraded_parts_seen"]
    assert sum(rows["provider-faults"]["seen"]["provider_calls"].values()) > 0
    assert rows["provider-faults"]["seen"]["moved_on"] > 0
    poison = rows["poison-burst"]["seen"]
    assert poison["dead_letters"] == poison["poison_sent"] and poison["error_replies"] == len(poison["addressed"])
    assert proc.returncode == 0
