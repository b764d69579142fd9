"""Calls to a remote pool's provider: an OpenAI-compatible `POST /chat/completions`.

One asyncio loop on a thread of its own runs every call of the worker over one
`httpx.AsyncClient` (one connection pool, at most `max_in_flight` connections, no
retries of its own: a 429's wait is the pool's to share, inference/remote_worker.py).
The worker's loop stays the only one touching Kafka and Redis: it starts and cancels
calls (`call`, `cancel`: safe from its thread) and reads what happened from `events`,
a queue of `Delta` (streamed text), `Done` (the text and the provider's usage),
`RateLimited` (a 429 and the wait its headers ask, inference/rate_limits.py) and
`Failed` (`error`: 5xx, other 4xx, timeouts, refused connections, unreadable answers;
`invalid`: 400, 413 and 422, the request's own fault). A cancelled call posts nothing:
its connection is closed, which is how an OpenAI-compatible server learns that the
caller went away and stops generating.

httpx, not the openai SDK: the worker needs every header of a 429 and no retries
behind its back (the SDK retries 429s itself, and its typed objects cost a pydantic
model per streamed token); the request and its server-sent events are a few lines.
The API key goes in one header of the client and nowhere else: never logged (httpx's
own request log is turned down to warnings), never in an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from inference.rate_limits import exhausted_wait, retry_wait
from streams.fleet_remote import RemoteSpec

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
INVALID_STATUSES = (400, 413, 422)  # the request's own fault: answered `invalid`
MESSAGE_CHARS = 300  # of a provider's error message, kept in the reply
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Delta:
    call: int
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    call: int
    text: str
    tokens_in: int | None  # the provider's usage, where it said
    tokens_out: int | None
    exhausted_s: float | None = None  # its limit is spent (x-ratelimit-remaining-*: 0): the wait


@dataclass(frozen=True, slots=True)
class RateLimited:
    call: int
    wait_s: float | None  # None: its headers gave no wait
    why: str


@dataclass(frozen=True, slots=True)
class Failed:
    call: int
    status: str  # `error` or `invalid`
    why: str


Event = Delta | Done | RateLimited | Failed


def chat_payload(spec: RemoteSpec, messages: list[dict[str, str]], max_tokens: int, temperature: float, stream: bool):
    """The body of the call: the envelope's messages, as chat messages, and its limits."""
    body: dict[str, Any] = {
        "model": spec.provider_model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


class Provider:
    """The worker's calls to one provider, on an event loop of their own."""

    def __init__(self, spec: RemoteSpec, api_key: str | None) -> None:
        self.spec = spec
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tidegate-provider", daemon=True)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(10)

    async def _open(self) -> None:
        limits = httpx.Limits(
            max_connections=self.spec.max_in_flight, max_keepalive_connections=self.spec.max_in_flight
        )
        timeout = httpx.Timeout(self.spec.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.spec.timeout_s))
        self._client = httpx.AsyncClient(headers=self._headers, limits=limits, timeout=timeout)

    def call(self, call: int, body: dict[str, Any]) -> None:
        """Starts a call; what happens to it comes on `events`, tagged `call`."""
        self._loop.call_soon_threadsafe(self._begin, call, body)

    def cancel(self, call: int) -> None:
        """Closes the call's connection (the provider stops generating); it posts nothing more."""
        self._loop.call_soon_threadsafe(self._cancel, call)

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancels the calls left and closes the connections."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)

    async def _close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _begin(self, call: int, body: dict[str, Any]) -> None:
        task = self._loop.create_task(self._run(call, body))
        self._tasks[call] = task
        task.add_done_callback(lambda _t: self._tasks.pop(call, None))

    def _cancel(self, call: int) -> None:
        task = self._tasks.get(call)
        if task is not None:
            task.cancel()

    async def _run(self, call: int, body: dict[str, Any]) -> None:
        assert self._client is not None
        try:
            async with self._client.stream("POST", self.spec.chat_url, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    self.events.put(refused(call, response))
                elif body.get("stream"):
                    self.events.put(await self._streamed(call, response))
                else:
                    self.events.put(answered(call, orjson.loads(await response.aread()), response.headers))
        except asyncio.CancelledError:
            raise
        except httpx.TimeoutException as exc:
            self.events.put(Failed(call, "error", f"no answer within {self.spec.timeout_s:g}s ({type(exc).__name__})"))
        except httpx.TransportError as exc:  # refused, reset, DNS: the provider cannot be reached
            self.events.put(Failed(call, "error", f"cannot reach the provider: {type(exc).__name__}: {exc}"[:300]))
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
            self.events.put(Failed(call, "error", f"unreadable answer from the provider: {exc!r}"[:300]))

    async def _streamed(self, call: int, response: httpx.Response) -> Event:
        """Reads the server-sent events: each delta's text posted as it comes, then the
        whole text with the usage of the last chunk (stream_options.include_usage)."""
        parts: list[str] = []
        usage: dict[str, Any] = {}
        finished = False  # a choice said why it ended: the answer is whole
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = orjson.loads(data)
            if "error" in chunk:  # a server that fails mid-stream says so in an event
                return Failed(call, "error", f"provider failed mid-stream: {message_of(chunk)}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                finished = finished or bool(choice.get("finish_reason"))
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    self.events.put(Delta(call, text))
        if not finished:  # cut short ([DONE] or the connection ended first): not an answer
            # llama-cpp-python's server ends a stream so when another request waits
            return Failed(call, "error", f"the stream ended without a finish_reason after {len(parts)} pieces")
        return Done(
            call,
            "".join(parts),
            usage.get("prompt_tokens"),
            usage.get("completion_tokens"),
            exhausted_wait(response.headers),
        )


def answered(call: int, body: dict[str, Any], headers: httpx.Headers) -> Done:
    """A `chat.completion`'s text and usage."""
    text = body["choices"][0]["message"].get("content") or ""
    usage = body.get("usage") or {}
    return Done(call, text, usage.get("prompt_tokens"), usage.get("completion_tokens"), exhausted_wait(headers))


def refused(call: int, response: httpx.Response) -> Event:
    """What a status other than 200 means for the call."""
    status = response.status_code
    if status == 429:
        headers = response.headers
        said = [f"{h}: {headers[h]}" for h in ("retry-after-ms", "retry-after") if h in headers]
        return RateLimited(call, retry_wait(headers), f"429 {', '.join(said) or 'without a wait'}")
    try:
        why = message_of(orjson.loads(response.content))
    except orjson.JSONDecodeError:
        why = response.text[:MESSAGE_CHARS]
    kind = "invalid" if status in INVALID_STATUSES else "error"
    return Failed(call, kind, f"the provider answered {status}: {why}"[: MESSAGE_CHARS + 40])


def message_of(body: Any) -> str:
    """An OpenAI-shaped error body's message."""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return str(message if message is not None else body)[:MESSAGE_CHARS]
