"""`tidegate gateway`: an OpenAI-compatible HTTP front on the Kafka pipeline.

    POST /v1/chat/completions   a chat completion (Bearer API key -> tenant)
    GET  /v1/models             the models of the fleet: ids, then aliases (gateway/models.py)
    GET  /v1/models/{id}        that model, or 404 model_not_found
    GET  /healthz               the process is up
    GET  /readyz                it reaches the broker (503 until it does)
    GET  /metrics               Prometheus text

Each tenant's requests go through a tidegate Client of that tenant (its own reply
topic under the tenant's prefix, so the secured setup's ACLs and reply checks
hold). OpenAI calls are stateless (each carries the whole conversation), so each
gets a conversation of its own. A request's `model` (and `fallbacks`, a list of
models to try after it) routes it; the response's `model` is the one that served
it, and `x-tidegate-fallback-from`/`-reason` say where a fallback did. How
tidegate's answers become HTTP answers:

    QueueFull, queue_full  429 code queue_full, retry-after-ms from the drain time
    rate_limited           429 code rate_limit_exceeded, retry-after-ms, x-ratelimit-*
    invalid                400          expired, no reply in time   504
    an unknown model       404 code model_not_found, naming the served ones
    error                  500          broker unreachable          503
    a body over the limit  413          RequestTooLarge             413

A request over the deployment's prompt limits is answered 400 before anything is
sent, and a body larger than any request the pipeline takes is refused as it
arrives, never read whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conversation.history import CANCEL_TTL_S, cancel_key, one_shot_session
from gateway.clients import ClientNotStarted, TenantClients
from gateway.keys import ApiKeys
from gateway.models import FleetView, ServedModels, UnknownModel
from gateway.openai_shapes import (
    BadRequest,
    completion,
    error,
    fallback_headers,
    new_request_id,
    parse_chat_request,
    retry_headers,
    timing_headers,
    too_many,
    unauthorized,
)
from gateway.sse import sse_events
from streams import Client, InvalidRequest, QueueFull, ReplyTimeout, RequestOptions, RequestTooLarge, Settings
from streams.exceptions import TidegateError
from streams.kafka import check_reachable
from streams.reply import Chunk
from streams.tenants import Tenants
from streams.validation import prompt_reason

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("tidegate_gateway_requests", "HTTP chat completions by status code", ["code"])
HTTP_LATENCY = Histogram(
    "tidegate_gateway_request_seconds",
    "Chat completion time at the gateway, by status code",
    ["code"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TIME_TO_FIRST_CHUNK = Histogram(
    "tidegate_gateway_time_to_first_chunk_seconds",
    "From a streaming request's arrival to its first chunk of text, at the gateway",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DEADLINE_S = 60.0
CANCELLED = Counter("tidegate_gateway_cancelled", "Requests cancelled because their HTTP caller went away")
MIN_BODY_LIMIT = 1 << 20
BYTES_PER_PROMPT_CHAR = 8  # a character escaped in JSON (\uXXXX) is 6 bytes, then the body around it


def body_limit(settings: Settings) -> int:
    """The largest body worth reading: room for a prompt of `max_prompt_chars`."""
    return max(MIN_BODY_LIMIT, BYTES_PER_PROMPT_CHAR * settings.max_prompt_chars)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to be over `limit` bytes (from its
    content-length, or while it streams in): a huge body is never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
    return b"".join(parts)


async def disconnected(request: Request) -> None:
    """Returns when the HTTP caller has gone away. The body was read, so the server
    has nothing more to hand over until the connection closes: one wait per request,
    woken once, where polling every 100 ms woke each waiting request ten times a
    second."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def done_unless_gone(request: Request, work: asyncio.Future[Any]) -> bool:
    """Waits for `work` or for the HTTP caller to go away, whichever comes first; True
    when `work` is done (its result is then ready)."""
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    return work.done()


def pipeline_error(exc: TidegateError) -> Response:
    """What the client raised, as HTTP: QueueFull 429, no reply in time 504, else 503."""
    if isinstance(exc, QueueFull):
        return too_many(f"tidegate is at capacity (stage {exc.stage}); retry later", "queue_full", exc.retry_after_ms)
    if isinstance(exc, ReplyTimeout):
        return error(504, "no reply in time", "timeout", "timeout")
    if isinstance(exc, RequestTooLarge):
        return error(413, str(exc), "invalid_request_error", "request_too_large")
    if isinstance(exc, UnknownModel):
        return error(404, str(exc), "invalid_request_error", "model_not_found", param=exc.param)
    if isinstance(exc, InvalidRequest):
        return error(400, str(exc), "invalid_request_error", "invalid_request")
    if isinstance(exc, ClientNotStarted):  # logged where it failed (gateway/clients.py)
        why = "the inference pipeline cannot be reached: the gateway's Kafka client did not start; retry later"
        return error(503, why, "server_error", "unavailable", retry_headers(exc.retry_after_ms))
    log.warning("pipeline unreachable: %s", exc)
    return error(503, "the inference pipeline cannot be reached", "server_error", "unavailable")


class Gateway:
    """The clients per tenant and the request handling, independent of the routes."""

    def __init__(self, settings: Settings, keys: ApiKeys, tenants: Tenants | None = None) -> None:
        self.settings = settings
        self.keys = keys
        self.tenants = tenants or Tenants.load(settings)
        self.clients = TenantClients(settings)
        self.fleet = FleetView(settings)  # FLEET_FILE read here: a wrong one stops the gateway
        self.redis = Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._tasks: set[asyncio.Future[Any]] = set()
        self.body_limit = body_limit(settings)

    async def client(self, tenant: str) -> Client:
        """The tenant's client, started on its first request (gateway/clients.py)."""
        return await self.clients.get(tenant)

    async def served(self, tenant: str, names: list[str] | None = None) -> ServedModels:
        """The models served now (gateway/models.py). Without a fleet file they come
        from the clients' pressure boards: with no client started yet, the tenant's
        is (a client that does not start leaves MODEL the one served)."""
        if self.fleet.file_fleet is None and not self.clients.started():
            with contextlib.suppress(TidegateError):
                await self.client(tenant)
        return await self.fleet.served(self.clients.started(), names)

    async def _options(self, tenant: str, asked: dict[str, Any]) -> RequestOptions:
        """The request's options; `asked["served"]`: the models it was routed among.

        :raises UnknownModel: a name the (strict) fleet does not serve."""
        served = asked["served"] = await self.served(tenant, [asked["model"], *asked["fallbacks"]])
        model, fallbacks = served.route(asked["model"], asked["fallbacks"])
        return RequestOptions(
            max_new_tokens=asked["max_new_tokens"],
            temperature=asked["temperature"],
            deadline_s=DEADLINE_S,
            model=model,
            fallbacks=fallbacks,
        )

    async def close(self) -> None:
        await self.clients.close()
        await self.redis.aclose()

    def tenant_of(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        return self.keys.tenant(key.strip()) if scheme.lower() == "bearer" and key else None

    async def chat(self, request: Request) -> Response:
        tenant = self.tenant_of(request)
        if tenant is None:
            return unauthorized()
        body = await read_body(request, self.body_limit)
        if body is None:
            why = f"the body is over {self.body_limit} bytes"
            return error(413, why, "invalid_request_error", "request_too_large")
        try:
            asked = parse_chat_request(orjson.loads(body))
        except orjson.JSONDecodeError as exc:
            return error(400, f"the body is not JSON: {exc}", "invalid_request_error", "invalid_json")
        except BadRequest as exc:
            return error(400, str(exc), "invalid_request_error", "invalid_request")
        too_much = prompt_reason(asked["messages"], self.settings)
        if too_much is not None:
            return error(400, too_much, "invalid_request_error", "invalid_request")
        if asked["stream"]:
            return await self.stream(request, tenant, asked)
        try:
            client = await self.client(tenant)
            options = await self._options(tenant, asked)
            # stateless: no history kept
            request_id = await client.submit(asked["messages"], one_shot_session(f"http-{new_request_id()}"), options)
            reply = await self._reply_unless_gone(request, client, tenant, request_id)
            if reply is None:
                return Response(status_code=499)  # nobody is there to read it
        except TidegateError as exc:
            return pipeline_error(exc)
        return self._answer(reply, asked, tenant)

    async def _reply_unless_gone(self, request: Request, client: Client, tenant: str, request_id: str) -> Any:
        """The reply, or None when the HTTP caller went away first: then the request is
        cancelled (queued, it never reaches the model; generating, it leaves the batch)."""
        waiting = asyncio.ensure_future(client.reply(request_id))
        if await done_unless_gone(request, waiting):
            return waiting.result()
        self._background(waiting)  # its `expired` reply still comes, and is dropped
        self.cancel(tenant, request_id)
        return None

    async def _first_chunk_unless_gone(self, request: Request, chunks: AsyncIterator[Chunk]) -> Chunk | None:
        """The stream's first chunk, or None when the HTTP caller went away first
        (the stream is closed: its request leaves the client)."""
        first = asyncio.ensure_future(anext(chunks))
        if await done_unless_gone(request, first):
            return first.result()
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]
        return None

    def cancel(self, tenant: str, request_id: str) -> None:
        """Marks the request cancelled for the workers (conversation/history.py cancel_key)."""
        CANCELLED.inc()
        self._background(asyncio.ensure_future(self.redis.set(cancel_key(tenant, request_id), 1, ex=CANCEL_TTL_S)))

    def _background(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stream(self, request: Request, tenant: str, asked: dict[str, Any]) -> Response:
        """Server-sent events: `chat.completion.chunk`s as the text is generated, then
        `data: [DONE]`. Until the first chunk the answer can still be an HTTP error
        (429, 400, ...); after it, an error is sent as `data: {"error": ...}`. A caller
        that hangs up before the first chunk cancels the request as one that hangs up
        after it does (before, it was noticed only once a first chunk came: the model
        had run by then)."""
        started = time.perf_counter()
        request_id = new_request_id()
        try:
            client = await self.client(tenant)
            options = (await self._options(tenant, asked)).replace(request_id=request_id)
            # stateless: no history kept
            chunks = client.stream(asked["messages"], one_shot_session(f"http-{new_request_id()}"), options)
            first = await self._first_chunk_unless_gone(request, chunks)
        except TidegateError as exc:
            return pipeline_error(exc)
        if first is None:
            self.cancel(tenant, request_id)
            return Response(status_code=499)  # nobody is there to read it
        if first.reply is not None and first.reply.status != "ok":
            return self._answer(first.reply, asked, tenant)
        TIME_TO_FIRST_CHUNK.observe(time.perf_counter() - started)
        return StreamingResponse(
            sse_events(first, chunks, asked, lambda: self.cancel(tenant, first.request_id)),
            media_type="text/event-stream",
            # a first chunk that is the whole reply (a runner without streaming) tells its model
            headers={"x-request-id": first.request_id, **(fallback_headers(first.reply) if first.reply else {})},
        )

    def _answer(self, reply: Any, asked: dict[str, Any], tenant: str) -> Response:
        headers = timing_headers(reply)
        if reply.status == "ok":
            served: ServedModels = asked["served"]  # set where the request was routed
            body = completion(reply, served.shown(asked["model"], reply), asked["max_new_tokens"])
            return JSONResponse(body, headers=headers)
        if reply.status == "queue_full":
            return too_many(reply.error or "tidegate is at capacity", "queue_full", reply.retry_after_ms, headers)
        if reply.status == "rate_limited":
            return too_many(
                reply.error or "over quota",
                "rate_limit_exceeded",
                reply.retry_after_ms,
                {**headers, **self._limit_headers(tenant, reply.retry_after_ms)},
            )
        if reply.status == "invalid" and (reply.error or "").startswith("unknown model"):
            # the processors' fleet knows less than the gateway's view of it did
            return error(404, reply.error or "", "invalid_request_error", "model_not_found", headers, "model")
        if reply.status == "invalid":
            return error(400, reply.error or "invalid request", "invalid_request_error", "invalid_request", headers)
        if reply.status == "expired":
            return error(504, reply.error or "the request expired", "timeout", "expired", headers)
        return error(500, reply.error or "the model failed", "server_error", "model_error", headers)

    def _limit_headers(self, tenant: str, retry_after_ms: int | None) -> dict[str, str]:
        """x-ratelimit-* of the tenant's quota; remaining 0 (it was just refused)."""
        policy = self.tenants.policy(tenant)
        reset = f"{retry_after_ms or 0}ms"
        headers = {}
        for kind, limit in (("requests", policy.requests_per_minute), ("tokens", policy.tokens_per_minute)):
            if limit:
                headers |= {
                    f"x-ratelimit-limit-{kind}": str(limit),
                    f"x-ratelimit-remaining-{kind}": "0",
                    f"x-ratelimit-reset-{kind}": reset,
                }
        return headers


def create_app(settings: Settings, keys: ApiKeys) -> Starlette:
    gateway = Gateway(settings, keys)

    async def chat(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await gateway.chat(request)
        except Exception:  # answered in OpenAI's shape, never Starlette's plain-text 500
            log.exception("chat completion failed")
            response = error(500, "the gateway failed on this request", "server_error", "internal_error")
        HTTP_REQUESTS.labels(str(response.status_code)).inc()
        HTTP_LATENCY.labels(str(response.status_code)).observe(time.perf_counter() - started)
        return response

    async def models(request: Request) -> Response:
        tenant = gateway.tenant_of(request)
        if tenant is None:
            return unauthorized()
        return JSONResponse({"object": "list", "data": (await gateway.served(tenant)).listing()})

    async def model(request: Request) -> Response:
        """`GET /v1/models/{id}` (the SDKs' `models.retrieve`): a served id or alias, else 404."""
        tenant = gateway.tenant_of(request)
        if tenant is None:
            return unauthorized()
        name = request.path_params["model"]
        served = await gateway.served(tenant, [name])
        entry = served.entry(name)
        if entry is None:
            return error(404, served.not_found(name), "invalid_request_error", "model_not_found", param="model")
        return JSONResponse(entry)

    async def not_found(request: Request, exc: Exception) -> Response:
        """Unknown paths and methods answered in OpenAI's error shape, not Starlette's text."""
        status = getattr(exc, "status_code", 404)
        why = f"{request.method} {request.url.path} is not served here"
        return error(status, why, "invalid_request_error", "not_found" if status == 404 else "method_not_allowed")

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        try:
            await asyncio.to_thread(check_reachable, settings.bootstrap, 1.0)
        except TidegateError as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await gateway.close()

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
