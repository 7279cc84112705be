"""Requests that ask for JSON, on real parts: the vLLM worker's answer checked and repaired once
through the same engine, and a provider model whose first JSON is wrong repaired through the
same endpoint; both calls billed in the one cost record of the attempt."""

from __future__ import annotations

import asyncio
import uuid
from http.server import BaseHTTPRequestHandler

import orjson
import pytest
from redis.asyncio import Redis

from schemas import ProviderSpec, Status
from services.worker.provider import ProviderBackend
from services.worker.service import Worker
from tests.http_fakes import serving
from tests.integration.conftest import wait_for_rows

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def tenant() -> str:
    return f"j{uuid.uuid4().hex[:8]}"


async def test_a_random_model_s_answer_is_refused_after_one_repair_and_both_calls_are_billed(
        worker, router, sink, client, store, policies):
    who = tenant()
    result = await client.complete(tenant=who, route="json", max_tokens=8, response_schema=SCHEMA,
                                   messages=[{"role": "user", "content": "Where is the Eiffel tower? Answer in JSON."}])
    # The tiny model's weights are random: it writes no JSON, the first time or the second.
    assert result.status == Status.failed and result.error.code == "invalid_output", result
    assert result.model == "small" and result.output
    assert any(r.startswith("output refused: not JSON") for r in result.route_reasons), result.route_reasons
    # Two engine calls, both counted: the first prompt is a dozen tokens or so, the repair holds it and much more.
    assert result.tokens_in > 60  # the repair prompt alone quotes the answer and the schema: hundreds of characters
    books = await wait_for_rows(store, "tenant = {t:String}", 1, {"t": who})
    assert (books["records"], books["tokens_in"], books["tokens_out"]) == (1, result.tokens_in, result.tokens_out)
    assert books["cost_nano_usd"] == policies.models["small"].price.cost_nano_usd(result.tokens_in, result.tokens_out)


class _WrongThenRight(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose first answer is prose and whose second is the JSON asked for."""

    calls: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
        self.calls.append(body)
        text = "It is in Paris." if len(self.calls) % 2 else '{"city": "Paris"}'
        data = orjson.dumps({"id": "c", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": 7 * len(body["messages"]), "completion_tokens": 5}})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


async def test_a_provider_s_wrong_json_is_repaired_through_the_same_endpoint(router, sink, client, store, policies,
                                                                              broker, topics, redis_url):
    redis = Redis.from_url(redis_url)
    with serving(_WrongThenRight) as base_url:
        backend = ProviderBackend(ProviderSpec(api="openai", base_url=base_url, model="m", timeout_s=10))
        stop = asyncio.Event()
        task = asyncio.create_task(Worker(model="jsonish", engine=backend, bootstrap=broker, topics=topics,
                                          redis=redis).run(stop))
        try:
            who = tenant()
            result = await client.complete(tenant=who, route="json-remote", max_tokens=16, response_schema=SCHEMA,
                                           messages=[{"role": "user", "content": "Where is the Eiffel tower?"}])
        finally:
            stop.set()
            await task
            await backend.aclose()
            await redis.aclose()
    assert result.status == Status.ok and result.output == '{"city": "Paris"}', result
    assert any(r.startswith("output repaired: not JSON") for r in result.route_reasons), result.route_reasons
    first, repair = _WrongThenRight.calls[-2:]
    assert first["response_format"]["json_schema"]["schema"] == SCHEMA
    assert [m["role"] for m in repair["messages"]] == ["user", "assistant", "user"]
    assert repair["messages"][1]["content"] == "It is in Paris."
    assert (result.tokens_in, result.tokens_out) == (7 + 21, 10)
    books = await wait_for_rows(store, "tenant = {t:String}", 1, {"t": who})
    assert (books["records"], books["tokens_in"], books["tokens_out"]) == (1, 28, 10)
    assert books["cost_nano_usd"] == policies.models["jsonish"].price.cost_nano_usd(28, 10)
