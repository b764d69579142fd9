"""The Python client: produce requests, and match replies to them by request_id.

    async with Client(bootstrap="127.0.0.1:9092") as client:
        reply = await client.generate(messages=[{"role": "user", "content": "hi"}], session_id="s1")
        request_id = await client.submit(messages=..., session_id="s2")
        reply = await client.reply(request_id)       # or: async for reply in client.replies()
        reply = await client.generate(messages, "s3", model="smol", fallbacks=["tiny"], max_new_tokens=32)

One background thread polls the reply consumer (streams/reply_reader.py); the
producer serves its own delivery reports (streams/delivery.py); another thread
keeps the latest pressure per stage (streams/pressure_feed.py), so `QueueFull` is
raised before anything is sent, without a broker round trip (streams/client_admission.py).
The client ties together what lives beside it, one job each: a request's options,
checked once (streams/request_options.py), building the request from them
(streams/client_requests.py), the table of pending requests and its sweep
(streams/pending.py), a streamed request's chunks (streams/streaming.py). The reply
consumer is assigned (no group join), starting at each reply partition's end as
listed before the first request, so no reply to this client's requests is missed.

Replies reach only their caller: each client creates its own reply topic,
`<replies>.<tenant>.<instance>`, when it starts, so it reads its own replies and
nobody else's (a shared reply topic would hand every client every tenant's
replies, and each client's reply traffic would grow with the number of clients).
`reply_topic=` names a topic to share instead. The topic is not deleted when the
client closes: a reply still on its way to a deleted topic held the worker that
produced it for minutes (librdkafka retries it until its message timeout), so
the topic stays, emptied by its hour's retention (docs/design.md).

Each reply is handed over once: to `generate`, to `reply(request_id)`, or to the
`replies()` iterator, whichever takes it first; a second copy of a reply (a
redelivery after a crash) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Unpack

from schemas import get_codec
from streams import client_admission
from streams.client_admission import PATH
from streams.client_reply_topic import delete_reply_topic
from streams.client_requests import MIN_RETRY_MS, Messages, build_request, request_record, retry_delay_ms
from streams.config import Settings
from streams.delivery import DeliveryProducer, RefusedForGood
from streams.exceptions import ReplyTimeout, RequestTooLarge, SendTimeout, TidegateError
from streams.kafka import (
    check_reachable,
    create_client_reply_topic,
    producer_config,
)
from streams.outgoing import now_ms
from streams.pending import SWEEP_INTERVAL_S, UNCLAIMED_REPLY_S, PendingRequest, PendingRequests, give_up_at
from streams.pressure import FORGET_STAGE_S
from streams.pressure_feed import PressureListener
from streams.reply import Chunk, Reply
from streams.reply_reader import ReplyReader
from streams.request_options import OptionFields, RequestOptions
from streams.streaming import stream_chunks
from streams.tenants import TENANT_NAME

log = logging.getLogger(__name__)

REPLY_GRACE_S = 5.0
# names that moved with their jobs stay importable from here; SWEEP_INTERVAL_S is read
# here at each delivery (a test sets it to 0: a sweep on every delivery)
__all__ = ["MIN_RETRY_MS", "PATH", "REPLY_GRACE_S", "SWEEP_INTERVAL_S", "UNCLAIMED_REPLY_S", "Client", "Messages"]


class Client:
    """Async client for services producing requests and awaiting replies.

    :param bootstrap: Kafka bootstrap servers; default from settings (TIDEGATE_BOOTSTRAP).
    :param settings: full settings; topics come from its prefix.
    :param tenant: the tenant of this client's requests (letters, digits, `_` and `-`);
        its reply topic is under the tenant's name.
    :param reply_topic: a reply topic to share (it must exist); default: a topic of
        this client's own, created on start.
    :param reply_grace_s: how long past a request's deadline a reply is still awaited
        (an `expired` one included); default 5 s.
    """

    def __init__(
        self,
        bootstrap: str | None = None,
        *,
        settings: Settings | None = None,
        tenant: str = "default",
        reply_topic: str | None = None,
        reply_grace_s: float = REPLY_GRACE_S,
    ) -> None:
        if not TENANT_NAME.fullmatch(tenant):
            raise TidegateError(f"tenant {tenant[:80]!r} must be 1-64 letters, digits, '_' or '-'")
        self.reply_grace_s = reply_grace_s
        base = settings or Settings()
        self.settings = base.model_copy(update={"bootstrap": bootstrap}) if bootstrap else base
        self.tenant = tenant
        self._own_reply_topic = reply_topic is None
        self._created_reply_topic = False  # by start(): deleted again if the start fails
        self.reply_topic = reply_topic or f"{self.settings.topics.replies}.{tenant}.{uuid.uuid4().hex[:16]}"
        self.codec = get_codec()
        self._pending = PendingRequests()
        self._arrived: asyncio.Queue[str] | None = None  # ids whose reply came, while replies() runs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer = DeliveryProducer(producer_config(self.settings))
        self._reader = ReplyReader(self.settings, self.reply_topic, self._deliver, self._deliver_chunk)
        self._stop = threading.Event()
        self._pressure = PressureListener(self.settings) if self.settings.backpressure else None

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connects, creates the reply topic and starts reading it. On any failure what
        was opened is closed again (a producer, a consumer, the pressure listener), the
        reply topic it created is deleted (streams/client_reply_topic.py) and the error
        is raised as a TidegateError naming the broker."""
        try:
            await self._start()
        except BaseException as exc:
            await self.close()
            if self._created_reply_topic:
                await asyncio.to_thread(delete_reply_topic, self.settings, self.reply_topic)
            if isinstance(exc, TidegateError) or not isinstance(exc, Exception):
                raise
            raise TidegateError(f"client not started on {self.settings.bootstrap}: {exc}") from exc

    async def _start(self) -> None:
        await asyncio.to_thread(check_reachable, self.settings.bootstrap)
        self._loop = asyncio.get_running_loop()
        self._producer.start()
        self._reader.open()
        if self._own_reply_topic:  # first: a broker that cannot create it fails the start in seconds
            self._created_reply_topic = True  # a create that timed out may still have created it
            await asyncio.to_thread(create_client_reply_topic, self.settings, self.reply_topic)
        if self._pressure is not None:
            await asyncio.to_thread(self._pressure.start, stopping=self._stop)  # close() ends its retries
        await asyncio.to_thread(self._reader.start, self._loop)

    @property
    def replies_read(self) -> int:
        """Records read off the reply topic: this client's reply traffic."""
        return self._reader.read

    async def close(self) -> None:
        self._stop.set()
        if self._pressure is not None:
            await asyncio.to_thread(self._pressure.close)
        await asyncio.to_thread(self._reader.close)
        await asyncio.to_thread(self._producer.close, 5)
        for pending in self._pending.values():
            pending.future.cancel()
        self._pending.clear()

    # -- sending --------------------------------------------------------------

    async def submit(
        self,
        messages: Messages,
        session_id: str,
        options: RequestOptions | None = None,
        *,
        stream: bool = False,
        **kwargs: Unpack[OptionFields],
    ) -> str:
        """Produces a request and returns its id once the broker has it; take its
        reply with `reply(request_id)` or from `replies()` (a streamed one's chunks:
        `stream()`).

        :param messages: the new turns, `{"role": ..., "content": ...}`; a `system`
            message replaces the configured system prompt.
        :param session_id: the conversation: its history is kept per (tenant, session).
        :param options: how to serve it (streams/request_options.py: tenant, priority,
            max_new_tokens, deadline_s, temperature, strategy, request_id, metadata,
            wait, model, fallbacks); keywords of the same names replace its fields.
        :raises InvalidRequest: an unknown option, or one of a wrong type or value
            (nothing was sent).
        :raises QueueFull: the path is full for this priority (nothing was sent).
        :raises RequestTooLarge: the broker refuses a record this large (nothing was sent).
        :raises SendTimeout: the broker did not acknowledge the request by its deadline
            (a ReplyTimeout).
        """
        assert self._loop is not None, "use `async with Client(...)`"
        opts = RequestOptions.of(options, kwargs)
        request = build_request(
            messages, session_id, opts, tenant=self.tenant, reply_to=self.reply_topic, stream=stream
        )
        await self._admit(request, opts.wait)
        request_id = str(request["request_id"])
        chunks: asyncio.Queue[Chunk] | None = asyncio.Queue() if stream else None
        self._pending[request_id] = PendingRequest(
            self._loop.create_future(), give_up_at(request, self.reply_grace_s), chunks=chunks
        )
        try:
            if request["deadline_ms"]:
                # a broker that does not acknowledge by the deadline: nobody waits any more
                timeout_s = max(0.0, (request["deadline_ms"] - now_ms()) / 1000)
                await asyncio.wait_for(self._produce(request), timeout_s)
            else:
                await self._produce(request)
        except TimeoutError as exc:
            self._pending.pop(request_id, None)
            raise SendTimeout(f"request {request_id} not acknowledged by the broker before its deadline") from exc
        except BaseException:
            self._pending.pop(request_id, None)
            self._settle(request_id)  # not sent: in nobody's lag
            raise
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.sending = False
            # acknowledged past its deadline and grace (a stalled loop): its caller still
            # has a grace to claim it before a sweep may take it for abandoned
            pending.give_up_at = max(pending.give_up_at, time.monotonic() + self.reply_grace_s)
        return request_id

    async def generate(
        self,
        messages: Messages,
        session_id: str,
        options: RequestOptions | None = None,
        **kwargs: Unpack[OptionFields],
    ) -> Reply:
        """`submit`, then `reply`: the reply (any status) once it arrives. With `wait`,
        a `queue_full` reply (a processor refused the request past its cap) is not the
        end either: the request is sent again at its `retry_after_ms` (plus up to a
        quarter, jitter), until its deadline; so is a `rate_limited` one (the tenant
        over its quota), after exactly its `retry_after_ms`. Each try keeps the
        request's id.

        :raises InvalidRequest, QueueFull: as `submit`.
        :raises ReplyTimeout: no reply came by the deadline plus `reply_grace_s`.
        """
        opts = RequestOptions.of(options, kwargs)
        opts = opts.replace(request_id=opts.request_id or uuid.uuid4().hex)
        deadline = time.monotonic() + opts.deadline_s if opts.deadline_s else float("inf")
        while True:
            remaining = deadline - time.monotonic()
            attempt = opts.replace(deadline_s=max(0.001, remaining)) if opts.deadline_s else opts
            reply = await self.reply(await self.submit(messages, session_id, attempt))
            if not (opts.wait and reply.status in ("queue_full", "rate_limited")):
                return reply
            if reply.status == "rate_limited":  # the quota's retry time is exact: no backoff
                delay_s = (reply.retry_after_ms or MIN_RETRY_MS) / 1000
            else:
                delay_s = retry_delay_ms(reply.retry_after_ms or 0) / 1000
            if time.monotonic() + delay_s >= deadline:
                return reply
            await asyncio.sleep(delay_s)

    # -- replies --------------------------------------------------------------

    async def stream(
        self,
        messages: Messages,
        session_id: str,
        options: RequestOptions | None = None,
        **kwargs: Unpack[OptionFields],
    ) -> AsyncIterator[Chunk]:
        """`submit` with streaming: yields the reply's text in `Chunk`s as the worker
        generates it (with continuous batching; other runners send the whole text at
        the end), then a last Chunk whose `reply` is the final Reply (any status) and
        whose text is whatever the chunks before did not carry: the chunks' texts add
        up to `reply.text`. Where two runs of the request stream at once (a
        redelivery, a revoked worker beside the new owner), one generation is followed
        (streams/stitching.py); a last chunk with `restart` set carries the whole of
        `reply.text` and replaces the text before it (the reply came from a run whose
        text took another turn).

        :raises InvalidRequest, QueueFull: as `submit`.
        :raises ReplyTimeout: no reply came by the deadline plus `reply_grace_s`.
        """
        request_id = await self.submit(messages, session_id, RequestOptions.of(options, kwargs), stream=True)
        pending = self._pending[request_id]
        pending.claimed = True
        try:
            async with contextlib.aclosing(stream_chunks(request_id, pending)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._pending.pop(request_id, None)

    async def reply(self, request_id: str, timeout_s: float | None = None) -> Reply:
        """The reply to a request this client submitted, once it arrives (at once if it
        already did). Waits until the request's deadline plus `reply_grace_s`, or
        `timeout_s` when given.

        :raises ReplyTimeout: no reply by then (the request stays pending when a
            `timeout_s` shorter than its deadline ran out).
        :raises KeyError: the id is not a pending request of this client (never
            submitted here, or its reply was already handed over).
        """
        pending = self._pending.get(request_id)
        if pending is None or pending.claimed:
            raise KeyError(f"{request_id!r} is not a pending request of this client")
        pending.claimed = True
        wait_s = max(0.0, pending.give_up_at - time.monotonic()) if timeout_s is None else timeout_s
        try:
            reply = await asyncio.wait_for(asyncio.shield(pending.future), wait_s)
        except TimeoutError as exc:
            pending.claimed = False
            if timeout_s is None or time.monotonic() >= pending.give_up_at:
                self._pending.pop(request_id, None)
            raise ReplyTimeout(f"no reply to {request_id} in time") from exc
        self._pending.pop(request_id, None)
        return reply

    async def replies(self) -> AsyncIterator[Reply]:
        """Replies to the requests this client submitted, as they arrive; those taken
        with `reply()` are not repeated here. Runs until the client closes."""
        assert self._loop is not None, "use `async with Client(...)`"
        if self._arrived is None:
            self._arrived = asyncio.Queue()
            for request_id, pending in self._pending.items():
                if pending.future.done() and not pending.claimed:
                    self._arrived.put_nowait(request_id)
        while not self._stop.is_set():
            request_id = await self._arrived.get()
            pending = self._pending.get(request_id)
            if pending is None or pending.claimed or not pending.future.done():
                continue
            del self._pending[request_id]
            yield pending.future.result()

    def pending_count(self) -> int:
        """Requests submitted whose reply was not handed over yet."""
        return len(self._pending)

    def pressure_states(self) -> list[dict[str, Any]]:
        """The latest PressureState of every stage this client read, the fleet's pools
        among them (streams/fleet.py fleet_from_states), that came within the last
        FORGET_STAGE_S (a pool removed from the fleet is forgotten); [] with backpressure off."""
        return self._pressure.board.states(FORGET_STAGE_S) if self._pressure is not None else []

    def pressure(self, stage: str) -> dict[str, Any] | None:
        """The latest PressureState of `stage` (`processors` or `workers`) this client
        read, or None (no state yet, or backpressure off)."""
        return self._pressure.board.state(stage) if self._pressure is not None else None

    def request_topic(self, tenant: str) -> str:
        """Where a request of `tenant` goes: its own request topic where tenants have
        them (TENANT_TOPICS, the secured setup: its principal may write nowhere else),
        else the shared one."""
        topics = self.settings.topics
        return topics.tenant_requests(tenant) if self.settings.tenant_topics else topics.requests

    def check_pressure(self, priority: str = "normal", *, model: str = "", fallbacks: Sequence[str] = ()) -> None:
        """Raises QueueFull if a request of `priority` for `model` (with `fallbacks`) would
        be refused now: every pool that could serve it is full (nothing is counted)."""
        if self._pressure is not None:
            client_admission.check(self._pressure.board, priority, model=model, fallbacks=fallbacks)

    def _deliver_chunk(self, chunk: Chunk) -> None:
        """On the event loop: queues a chunk for its stream (none for other requests)."""
        self._pending.queue_chunk(chunk)

    def _deliver(self, reply: Reply) -> None:
        """On the event loop: resolves the request's future (the first copy only)."""
        pending = self._pending.resolve(reply)
        if pending is not None:
            self._settle(reply.request_id)
            if self._arrived is not None and not pending.claimed:
                self._arrived.put_nowait(reply.request_id)
        self._pending.forget_abandoned(SWEEP_INTERVAL_S)

    def _settle(self, request_id: str) -> None:
        """The request no longer counts against the path's caps on this client's board."""
        if self._pressure is not None:
            self._pressure.board.settle(request_id)

    # -- admitting and producing ----------------------------------------------

    async def _admit(self, request: dict[str, Any], wait: bool) -> None:
        """Raises QueueFull at once when the path is full for the request's priority;
        with `wait`, retries at each refusal's retry time until the deadline."""
        if self._pressure is not None:
            await client_admission.admit(self._pressure.board, request, wait)

    async def _produce(self, request: dict[str, Any]) -> None:
        record = request_record(request, self.request_topic(request["tenant"]))
        try:
            await self._producer.send_all([record])
        except RefusedForGood as exc:
            if exc.too_large:
                raise RequestTooLarge(f"request of {len(record.value)} bytes refused by the broker: {exc}") from exc
            raise
