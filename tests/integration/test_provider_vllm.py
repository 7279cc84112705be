"""ProviderBackend against a real OpenAI-compatible server: vLLM's own api_server on CPU, serving
the tiny model, with an API key and prompt-token details switched on."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from schemas.policy import ProviderSpec
from schemas.request import InferenceRequest
from services.worker.provider import ProviderBackend
from shared.errors import InputTooLarge, ProviderRejected

pytestmark = pytest.mark.integration

SERVER_READY_TIMEOUT_S = 600
KEY = "sk-vllm-test-7c1d0b9e"
KEY_ENV = "SWITCHYARD_TEST_VLLM_KEY"
MAX_MODEL_LEN = 512


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_url(model_path, tmp_path_factory) -> str:
    """`python -m vllm.entrypoints.openai.api_server` on the tiny model (about a minute to start here)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
             "--max-model-len", str(MAX_MODEL_LEN), "--api-key", KEY,
             "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens: prefix-cache reuse
             "--uvicorn-log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM's api_server exited with {proc.returncode}:\n" + log_path.read_text()[-4000:])
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vLLM's api_server was not healthy in time:\n" + log_path.read_text()[-4000:])
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        # The server's engine runs in child processes of its own session: stop them all.
        stop_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            stop_group(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass  # already gone


@pytest.fixture
async def backend(vllm_url, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    backend = ProviderBackend(ProviderSpec(api="openai", base_url=vllm_url, model="tiny", api_key_env=KEY_ENV,
                                           timeout_s=120))
    yield backend
    await backend.aclose()


def chat(content: str = "how long is the river near the mountain?", **fields) -> InferenceRequest:
    return InferenceRequest(tenant="acme", route="chat", reply_to="app", sampling={"seed": 1, **fields},
                            messages=[{"role": "system", "content": "You answer questions about rivers."},
                                      {"role": "user", "content": content}])


async def test_a_completion_comes_back_counted_and_with_confidence(backend):
    done = await backend.run(chat(), request_id="v1", max_tokens=12)

    assert done.finish_reason in ("length", "stop") and not done.expired
    assert done.tokens_in > 10 and 1 <= done.tokens_out <= 12
    assert 0 < done.confidence <= 1
    assert done.ttft_ms is not None


async def test_a_stream_sends_deltas_that_make_the_text(backend):
    deltas = []

    async def on_text(text: str) -> None:
        deltas.append(text)

    done = await backend.run(chat(), request_id="v2", max_tokens=16, on_text=on_text)

    assert deltas and "".join(deltas) == done.text
    assert done.tokens_in > 10 and 1 <= done.tokens_out <= 16
    assert 0 < done.confidence <= 1
    assert done.ttft_ms is not None


async def test_many_requests_share_one_client_at_once(backend):
    done = await asyncio.gather(*(backend.run(chat(f"question {i}: where does the river meet the sea?"),
                                              request_id=f"v3-{i}", max_tokens=8) for i in range(8)))

    assert all(d.tokens_out >= 1 and 0 < d.confidence <= 1 for d in done)


async def test_a_repeated_prefix_is_reported_as_cached(backend):
    long = " ".join(["the river runs past the mountain to the sea"] * 30)
    await backend.run(chat(long), request_id="v4a", max_tokens=2)
    again = await backend.run(chat(long), request_id="v4b", max_tokens=2)

    assert again.cached_tokens >= 16 and again.cached_tokens <= again.tokens_in


async def test_a_prompt_over_the_context_is_too_large(backend):
    with pytest.raises(InputTooLarge, match="maximum context length"):
        await backend.run(chat("river " * MAX_MODEL_LEN), request_id="v5", max_tokens=8)


async def test_a_wrong_key_is_refused_without_showing_it(vllm_url, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-3e5a")
    backend = ProviderBackend(ProviderSpec(api="openai", base_url=vllm_url, model="tiny", api_key_env=KEY_ENV))
    try:
        with pytest.raises(ProviderRejected) as raised:
            await backend.run(chat(), request_id="v6", max_tokens=4)
    finally:
        await backend.aclose()

    assert "401" in str(raised.value) and KEY_ENV in str(raised.value)
    assert "sk-wrong-key-3e5a" not in str(raised.value)
