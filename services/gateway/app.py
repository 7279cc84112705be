"""The OpenAI-compatible HTTP API, for services that cannot speak Kafka.

Every request goes the way a Kafka producer's does: onto the requests topic of its priority,
through the router (policy, limits, caches, the choice of model), to a worker, and back on the
gateway's reply topic, with a cost record in the books. The gateway only translates and waits.

Who is calling comes from the API key (services.gateway.keys): it names the tenant that pays,
and may limit the routes. The route is the `model` of the body (`model="chat"`), or the
X-Switchyard-Route header; X-Switchyard-Tenant bills another tenant the key may bill,
X-Switchyard-Priority picks the topic (default interactive), Idempotency-Key and
X-Switchyard-Prefix-Key map to the request's idempotency key and session key. A wrong key gets
401 and nothing reaches the topics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from schemas import InferenceRequest, InferenceResult, PolicySet, Priority, Status, StreamDelta
from services.gateway import metrics
from services.gateway.keys import ApiKey, KeyRing
from shared import openai_format as oa
from shared.client import Client
from shared.codec import encode
from shared.errors import DependencyUnavailable, RequestTimeout
from shared.metrics import route_label

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # the router dead-letters larger requests unread: refuse them here, with a reason


def _json(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def _error(status: int, message: str, kind: str, code: str | None, param: str | None = None,
           headers: dict[str, str] | None = None) -> Response:
    return _json(oa.error_body(message, kind, code, param), status, headers)


def _sse(data: dict) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


class Gateway:
    def __init__(self, client: Client, keys: KeyRing, policies: Callable[[], PolicySet | None], *,
                 timeout_s: float = 300.0):
        self._client = client
        self._keys = keys
        self._policies = policies  # the policy in force, read live: routes come and go without a restart
        self._timeout_s = timeout_s
        self.app = Starlette(routes=[
            Route(oa.CHAT, self.chat, methods=["POST"]),
            Route(oa.COMPLETIONS, self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
        ])

    async def healthz(self, request: Request) -> Response:
        return _json({"ok": True})

    def _authenticate(self, request: Request) -> ApiKey | None:
        key = self._keys.authenticate(request.headers.get("authorization"))
        if key is None:
            metrics.AUTH_FAILURES.inc()
        return key

    @staticmethod
    def _unauthorized() -> Response:
        return _error(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                      "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def models(self, request: Request) -> Response:
        key = self._authenticate(request)
        if key is None:
            return self._unauthorized()
        policies = self._policies()
        routes = sorted(r for r in (policies.routes if policies else ()) if key.may_use(r))
        return _json({"object": "list", "data": [
            {"id": route, "object": "model", "created": 0, "owned_by": "switchyard"} for route in routes]})

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, oa.CHAT, oa.chat_request)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, oa.COMPLETIONS, oa.completion_request)

    async def _complete(self, http: Request, endpoint: str, build) -> Response:
        started = time.monotonic()
        route = "_none"
        response = None
        try:
            response, route = await self._answer(http, endpoint, build, started)
            return response
        finally:
            status = response.status_code if response is not None else 500
            metrics.REQUESTS.labels(endpoint, route_label(route), str(status)).inc()
            if not isinstance(response, StreamingResponse):  # a stream observes itself when it ends
                metrics.LATENCY.labels(endpoint, "false").observe(time.monotonic() - started)

    async def _answer(self, http: Request, endpoint: str, build, started: float) -> tuple[Response, str]:
        key = self._authenticate(http)
        if key is None:
            return self._unauthorized(), "_none"
        raw = await http.body()
        if len(raw) > MAX_BODY_BYTES:
            return _error(413, f"the body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted",
                          "invalid_request_error", "request_too_large"), "_none"
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"the body is not valid JSON: {exc}", "invalid_request_error", "invalid_json"), "_none"
        route = http.headers.get("x-switchyard-route") or (body.get("model") if isinstance(body, dict) else None)
        refused = self._check_route(key, route)
        if refused is not None:
            return refused, "_none"
        tenant = http.headers.get("x-switchyard-tenant") or key.tenant
        if not key.may_bill(tenant):
            return _error(403, f"the key {key.name!r} may not bill tenant {tenant!r}", "permission_error",
                          "tenant_not_allowed"), route
        priority = http.headers.get("x-switchyard-priority", Priority.interactive.value)
        if priority not in Priority.__members__:
            return _error(400, f"X-Switchyard-Priority must be one of {', '.join(Priority.__members__)}",
                          "invalid_request_error", "invalid_priority"), route
        extra = {"deadline_unix_ms": int((time.time() + self._timeout_s) * 1000)}
        if http.headers.get("idempotency-key"):
            extra["idempotency_key"] = http.headers["idempotency-key"]
        if http.headers.get("x-switchyard-prefix-key"):
            extra["prefix_key"] = http.headers["x-switchyard-prefix-key"]
        try:
            inference = build(body, tenant=tenant, route=route, reply_to=self._client.reply_to,
                              priority=Priority(priority), **extra)
        except oa.BadRequest as exc:
            return _error(400, str(exc), "invalid_request_error", exc.code, exc.param), route
        if len(encode(inference)) > MAX_BODY_BYTES:
            return _error(413, f"the request is over {MAX_BODY_BYTES} bytes once encoded", "invalid_request_error",
                          "request_too_large"), route
        if inference.stream:
            return await self._stream(inference, endpoint, started, body), route
        try:
            result = await self._client.submit(inference, self._timeout_s)
        except RequestTimeout as exc:
            return _error(504, str(exc), "timeout_error", "timeout"), route
        except DependencyUnavailable as exc:
            return _error(503, str(exc), "server_error", exc.code), route
        return self._result(result, endpoint, int(started_wall(started))), route

    def _check_route(self, key: ApiKey, route: object) -> Response | None:
        if not isinstance(route, str) or not route:
            return _error(400, "name the route as the body's 'model' or in the X-Switchyard-Route header",
                          "invalid_request_error", "model_required", "model")
        policies = self._policies()
        known = policies is not None and (route in policies.routes or policies.unknown_route != "reject")
        if not key.may_use(route) or not known:
            return _error(404, f"the model {route!r} does not exist or this key may not use it; "
                          "GET /v1/models lists the routes it may use", "invalid_request_error", "model_not_found",
                          "model")
        return None

    @staticmethod
    def _headers(result: InferenceResult) -> dict[str, str]:
        headers = {"x-request-id": result.request_id, "x-switchyard-cache": result.cache_hit.value}
        if result.model:
            headers["x-switchyard-model"] = result.model
        if result.tier:
            headers["x-switchyard-tier"] = result.tier
        return headers

    def _result(self, result: InferenceResult, endpoint: str, created: int) -> Response:
        if result.status != Status.ok:
            status, body, headers = oa.error_status(result)
            return _json(body, status, {**headers, **self._headers(result)})
        body = oa.chat_completion(result, created) if endpoint == oa.CHAT else oa.text_completion(result, created)
        return _json(body, 200, self._headers(result))

    def _holds_back(self, route: str) -> bool:
        """Whether a stream on this route must wait for the final answer: where a confident-enough
        check can hand the answer to a stronger model, text already streamed could not be taken back."""
        policies = self._policies()
        policy = policies.routes.get(route) if policies else None
        return policy is not None and policy.escalate_below_confidence is not None and len(policy.models) > 1

    async def _stream(self, inference: InferenceRequest, endpoint: str, started: float, body: dict) -> Response:
        created = int(started_wall(started))
        held = self._holds_back(inference.route)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if held:
            inference = inference.model_copy(update={"stream": False})
            events = _once(self._client.submit(inference, self._timeout_s))
        else:
            events = self._client.stream_request(inference, self._timeout_s)
        try:
            first = await anext(events)
        except RequestTimeout as exc:
            await events.aclose()
            return _error(504, str(exc), "timeout_error", "timeout")
        except DependencyUnavailable as exc:
            await events.aclose()
            return _error(503, str(exc), "server_error", exc.code)
        if isinstance(first, InferenceResult) and first.status != Status.ok:
            await events.aclose()  # nothing was streamed yet: an HTTP error, as OpenAI answers it
            return self._result(first, endpoint, created)
        metrics.FIRST_EVENT.labels(endpoint).observe(time.monotonic() - started)
        pieces = _Pieces(inference.id, created, endpoint, include_usage)
        return StreamingResponse(self._events(first, events, pieces, endpoint, started),
                                 media_type="text/event-stream",
                                 headers={"x-request-id": inference.id, "cache-control": "no-cache"})

    async def _events(self, first, events: AsyncIterator, pieces: _Pieces, endpoint: str,
                      started: float) -> AsyncIterator[bytes]:
        try:
            item = first
            while True:
                for chunk in pieces.take(item):
                    yield _sse(chunk)
                if isinstance(item, InferenceResult):
                    break
                try:
                    item = await anext(events)
                except (RequestTimeout, DependencyUnavailable) as exc:
                    yield _sse(oa.error_body(str(exc), "timeout_error" if isinstance(exc, RequestTimeout)
                                             else "server_error", exc.code, request_id=pieces.request_id))
                    break
            yield _DONE
        finally:
            await events.aclose()
            metrics.LATENCY.labels(endpoint, "true").observe(time.monotonic() - started)


class _Pieces:
    """Turns deltas and the result of one request into OpenAI stream chunks.

    Deltas of a later attempt (the request moved to another model) start the text anew: if
    nothing was sent yet they are simply the text; if some was, the rest is taken from the result
    when it extends what was sent, and otherwise the stream ends with an error rather than with
    a text that is neither answer."""

    def __init__(self, request_id: str, created: int, endpoint: str, include_usage: bool):
        self.request_id = request_id
        self._created = created
        self._chat = endpoint == oa.CHAT
        self._usage = include_usage
        self._sent = ""
        self._attempt: int | None = None
        self._model: str | None = None
        self._started = False

    def _chunk(self, text: str | None = None, finish: str | None = None, role: str | None = None) -> dict:
        if self._chat:
            return oa.chat_chunk(self.request_id, self._created, self._model, content=text, role=role, finish=finish)
        return oa.completion_chunk(self.request_id, self._created, self._model, text=text or "", finish=finish)

    def _opening(self) -> list[dict]:
        if self._started or not self._chat:
            self._started = True
            return []
        self._started = True
        return [self._chunk("", role="assistant")]

    def take(self, item: StreamDelta | InferenceResult) -> list[dict]:
        if isinstance(item, StreamDelta):
            if self._attempt is not None and item.attempt != self._attempt and (self._sent or item.attempt < self._attempt):
                return []  # a later attempt after text went out: its answer comes with the result
            self._attempt = item.attempt
            self._model = item.model or self._model
            out = self._opening()
            if item.text:
                self._sent += item.text
                out.append(self._chunk(item.text))
            return out
        result = item
        self._model = result.model or self._model
        out = self._opening()
        if result.status != Status.ok:
            _, body, _ = oa.error_status(result)
            return [*out, body]
        if not result.output.startswith(self._sent):
            return [*out, oa.error_body(
                f"the answer moved to model {result.model} after part of another model's answer was streamed; "
                f"ask again without streaming, or read the whole answer as request {result.request_id}",
                "server_error", "stream_restarted", request_id=result.request_id)]
        rest = result.output[len(self._sent):]
        if rest:
            out.append(self._chunk(rest))
        out.append(self._chunk(None if self._chat else "", finish=oa.finish_reason(result)))
        if self._usage:
            usage_chunk = self._chunk(None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = oa.usage(result)
            out.append(usage_chunk)
        return out


async def _once(result_of) -> AsyncIterator[InferenceResult]:
    yield await result_of


def started_wall(started_monotonic: float) -> float:
    """The wall-clock second a request that started at `started_monotonic` arrived."""
    return time.time() - (time.monotonic() - started_monotonic)
