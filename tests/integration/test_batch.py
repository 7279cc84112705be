"""Batch jobs as a user runs them: `switchyard batch submit` in its own process, killed half-way and
run again, against the real broker, router and vLLM worker; `batch status` from another process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import orjson
import pytest

from schemas import CostRecord, InferenceResult
from shared.codec import decode
from tests.integration.conftest import ROOT, records_on

pytestmark = pytest.mark.integration

GOOD = 24


def batch_file(path, tag: str):
    lines = []
    for i in range(GOOD):
        if i % 6 == 5:
            lines.append({"custom_id": f"c-{i}", "method": "POST", "url": "/v1/completions",
                          "body": {"model": "ignored", "prompt": f"{tag} story {i}:", "max_tokens": 4}})
        else:
            lines.append({"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "ignored", "max_tokens": 4,
                                   "messages": [{"role": "user", "content": f"{tag} question {i}"}]}})
    text = [json.dumps(x) for x in lines]
    # Bad lines between the good ones, each with its own fault; their numbers are reported.
    text.insert(2, '{"custom_id": "broken", "method": "POST", ')  # line 3
    text.insert(6, json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}))  # line 7
    text.insert(9, json.dumps({"custom_id": "c-0", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": [{"role": "user", "content": "again"}]}}))  # line 10
    text.insert(12, json.dumps({"custom_id": "two", "url": "/v1/chat/completions",
                                "body": {"n": 2, "messages": [{"role": "user", "content": "x"}]}}))  # line 13
    text.insert(15, json.dumps({"custom_id": "emb", "url": "/v1/embeddings", "body": {"input": "x"}}))  # line 16
    path.write_text("\n".join(text) + "\n")
    return {3: "not valid JSON", 7: "custom_id", 10: "already used on line", 13: "n=1", 16: "url"}


def run_cli(env, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.cli.main", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


async def test_a_batch_runs_its_good_lines_reports_bad_ones_and_resumes_without_running_twice(
        worker, router, broker, topics, policy_file, tmp_path):
    source = tmp_path / "requests.jsonl"
    faults = batch_file(source, tmp_path.name)
    env = dict(os.environ, SWITCHYARD_BOOTSTRAP=broker, SWITCHYARD_TOPIC_PREFIX=topics.prefix,
               SWITCHYARD_POLICY=str(policy_file), SWITCHYARD_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    command = ["batch", "submit", str(source), "--route", "chat", "--tenant", "batch-team"]

    # A first run, killed while it publishes (8 lines a second: 3 s for the whole file).
    first = run_cli(env, *command, "--rate", "8", start_new_session=True)
    line = await asyncio.to_thread(first.stderr.readline)
    while "starting" not in line:
        assert line, "the first run ended before starting: " + first.stderr.read()
        line = await asyncio.to_thread(first.stderr.readline)
    job = line.split()[1].rstrip(":")
    await asyncio.sleep(1.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    early = run_cli(env, "batch", "status", job, "--json")
    out, err = await asyncio.to_thread(early.communicate)
    assert early.returncode == 0, err
    assert json.loads(out)["answered"] < GOOD, "the first run was not interrupted half-way"

    # The same command again resumes it, and finishes it.
    second = run_cli(env, *command, "--rate", "50", "--timeout", "300")
    out, err = await asyncio.to_thread(second.communicate)
    assert second.returncode == 1, err  # 1: the file has bad lines
    assert f"batch {job}: resuming" in err
    for number, why in faults.items():
        assert any(f"{source}:{number}: " in e and why in e for e in err.splitlines()), (number, err)
    assert f"{GOOD}/{GOOD}" in err  # the progress bar's last word
    assert f"{GOOD} of {GOOD} lines answered ({GOOD} ok, 0 errors), 5 bad lines" in err

    output = [orjson.loads(x) for x in (tmp_path / "requests.output.jsonl").read_bytes().splitlines()]
    assert [o["custom_id"] for o in output] == [f"c-{i}" for i in range(GOOD)]
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in output)
    kinds = {o["custom_id"]: o["response"]["body"]["object"] for o in output}
    assert kinds["c-5"] == "text_completion" and kinds["c-0"] == "chat.completion"
    assert all(o["response"]["body"]["usage"]["completion_tokens"] > 0 for o in output)
    errors = [orjson.loads(x) for x in (tmp_path / "requests.errors.jsonl").read_bytes().splitlines()]
    assert [e["error"]["line"] for e in errors] == sorted(faults)

    # Each line ran and was billed once: one result on the job's reply topic, one cost record.
    results = [decode(InferenceResult, v) for v in await records_on(broker, topics.replies(job))]
    assert sorted(r.request_id for r in results) == sorted(f"{job}.{n}" for n in _good_numbers(faults))
    costs = [decode(CostRecord, v) for v in await records_on(broker, topics.costs)]
    mine = [(c.request_id, c.attempt) for c in costs if c.request_id.startswith(f"{job}.")]
    assert len(mine) == GOOD and len(set(mine)) == GOOD
    assert {c.tenant for c in costs if c.request_id.startswith(f"{job}.")} == {"batch-team"}

    # Its progress, from anywhere the broker is reachable.
    status = run_cli(env, "batch", "status", job, "--json")
    out, err = await asyncio.to_thread(status.communicate)
    report = json.loads(out)
    assert (report["state"], report["answered"], report["pending"], report["bad"]) == ("done", GOOD, 0, 5)
    assert report["results"] == {"ok": GOOD}
    assert [b["line"] for b in report["bad_lines"]] == sorted(faults)
    table = run_cli(env, "batch", "status", job)
    out, _ = await asyncio.to_thread(table.communicate)
    assert f"batch {job}  (done)" in out and f"{GOOD} of {GOOD}" in out


async def test_status_of_an_unknown_job_says_so(broker, topics, policy_file, tmp_path):
    env = dict(os.environ, SWITCHYARD_BOOTSTRAP=broker, SWITCHYARD_TOPIC_PREFIX=topics.prefix,
               SWITCHYARD_POLICY=str(policy_file))
    proc = run_cli(env, "batch", "status", "batch_0000000000000000")
    _, err = await asyncio.to_thread(proc.communicate)
    assert proc.returncode == 2 and "no batch job 'batch_0000000000000000'" in err


def _good_numbers(faults: dict[int, str]) -> list[int]:
    numbers, n = [], 0
    while len(numbers) < GOOD:
        n += 1
        if n not in faults:
            numbers.append(n)
    return numbers
