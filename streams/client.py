"""The Python client: produce requests, and match replies to them by request_id.

    async with Client(bootstrap="127.0.0.1:9092") as client:
        reply = await client.generate(messages=[{"role": "user", "content": "hi"}], session_id="s1")
        request_id = await client.submit(...)      # the reply comes on the reply topic

One background thread polls the reply consumer; the producer serves its own
delivery reports (streams/delivery.py); another thread keeps the latest pressure
per stage (streams/pressure_feed.py), so
`QueueFull` is raised before anything is sent, without a broker round trip.
The reply consumer is assigned (no group join), starting at each reply
partition's end as listed before the first request: on the embedded broker that
listing may be a little early, never late, so no reply is missed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import uuid
from types import TracebackType
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas import AVRO, SerializationError, content_type_header, get_codec
from streams.config import Settings
from streams.delivery import DeliveryProducer
from streams.exceptions import QueueFull, ReplyTimeout, TidegateError
from streams.kafka import check_reachable, consume_ready, consumer_config, producer_config
from streams.lag import PROCESSORS, WORKERS
from streams.outgoing import Outgoing, now_ms
from streams.pressure_feed import PressureListener

log = logging.getLogger(__name__)

Reply = dict[str, Any]
REPLY_GRACE_S = 5.0
PATH = [PROCESSORS, WORKERS]  # the stages every request passes
BACKOFF_FACTOR = 2.0


class Client:
    """Async client for services producing requests and awaiting replies.

    :param bootstrap: Kafka bootstrap servers; default from settings (TIDEGATE_BOOTSTRAP).
    :param settings: full settings; topics come from its prefix.
    :param reply_topic: where replies are sent; default the settings' reply topic.
    :param reply_grace_s: how long past a request's deadline `generate` still waits
        for its reply (an `expired` one included); default 5 s.
    """

    def __init__(
        self,
        bootstrap: str | None = None,
        *,
        settings: Settings | None = None,
        reply_topic: str | None = None,
        reply_grace_s: float = REPLY_GRACE_S,
    ) -> None:
        self.reply_grace_s = reply_grace_s
        base = settings or Settings()
        self.settings = base.model_copy(update={"bootstrap": bootstrap}) if bootstrap else base
        self.reply_topic = reply_topic or self.settings.topics.replies
        self.codec = get_codec()
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer = DeliveryProducer(producer_config(self.settings))
        self._consumer: Consumer | None = None
        self._thread: threading.Thread | None = None
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
        await asyncio.to_thread(check_reachable, self.settings.bootstrap)
        self._loop = asyncio.get_running_loop()
        self._producer.start()
        self._consumer = Consumer(consumer_config(self.settings, f"tidegate-client-{uuid.uuid4().hex}"))
        await asyncio.to_thread(self._assign_reply_partitions)
        if self._pressure is not None:
            await asyncio.to_thread(self._pressure.start)
        self._thread = threading.Thread(target=self._poll_loop, name="tidegate-client", daemon=True)
        self._thread.start()

    def _assign_reply_partitions(self) -> None:
        assert self._consumer is not None
        try:
            meta = self._consumer.list_topics(self.reply_topic, timeout=10)
        except KafkaException as exc:
            raise TidegateError(
                f"broker {self.settings.bootstrap} unreachable ({exc.args[0].str()}); is the stack up "
                "(`tidegate dev up`)?"
            ) from exc
        topic = meta.topics.get(self.reply_topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise TidegateError(f"reply topic {self.reply_topic!r} not found on {self.settings.bootstrap}")
        assignment = []
        for p in topic.partitions:
            _, high = self._consumer.get_watermark_offsets(
                TopicPartition(self.reply_topic, p), timeout=10, cached=False
            )
            assignment.append(TopicPartition(self.reply_topic, p, high))
        self._consumer.assign(assignment)

    async def close(self) -> None:
        self._stop.set()
        if self._pressure is not None:
            await asyncio.to_thread(self._pressure.close)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
        await asyncio.to_thread(self._producer.close, 5)
        if self._consumer is not None:
            await asyncio.to_thread(self._consumer.close)
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def _poll_loop(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            for message in consume_ready(self._consumer, 500, 0.05):
                if message.error() is not None:
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("reply consumer: %s", message.error())
                    continue
                self._on_reply(message.value(), message.headers())

    def _on_reply(self, value: bytes | None, headers: Any) -> None:
        try:
            reply, _ = self.codec.decode_message(value, headers, "InferenceReply")
        except SerializationError as exc:
            log.warning("undecodable reply skipped: %s", exc)
            return
        future = self._pending.get(reply["request_id"])
        if future is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve, future, reply)

    def build_request(
        self,
        messages: list[dict[str, str]],
        session_id: str,
        *,
        tenant: str = "default",
        priority: str = "normal",
        max_new_tokens: int = 64,
        deadline_s: float = 30.0,
        temperature: float = 0.0,
        strategy: str | None = None,
        request_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        created = now_ms()
        return {
            "request_id": request_id or uuid.uuid4().hex,
            "session_id": session_id,
            "tenant": tenant,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "priority": priority,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "created_ms": created,
            "deadline_ms": created + int(deadline_s * 1000) if deadline_s else 0,
            "reply_to": self.reply_topic,
            "strategy": strategy,
            "metadata": metadata or {},
        }

    def check_pressure(self, priority: str = "normal") -> None:
        """Raises QueueFull if a request of `priority` would be refused now (nothing is counted)."""
        if self._pressure is not None:
            refusal = self._pressure.board.check(PATH, priority)
            if refusal is not None:
                raise QueueFull(refusal.stage, refusal.lag, refusal.cap, refusal.retry_after_ms)

    async def _admit(self, request: dict[str, Any], wait: bool) -> None:
        """Raises QueueFull at once when the path is full for the request's priority;
        with `wait`, retries with exponential backoff and jitter until the deadline."""
        if self._pressure is None:
            return
        attempt = 0
        while True:
            refusal = self._pressure.board.admit(PATH, request["priority"])
            if refusal is None:
                return
            error = QueueFull(refusal.stage, refusal.lag, refusal.cap, refusal.retry_after_ms)
            if not wait:
                raise error
            delay_ms = refusal.retry_after_ms * (BACKOFF_FACTOR ** min(attempt, 4)) * random.uniform(0.5, 1.0)
            if request["deadline_ms"] and now_ms() + delay_ms >= request["deadline_ms"]:
                raise error
            attempt += 1
            await asyncio.sleep(delay_ms / 1000)

    async def submit(
        self, messages: list[dict[str, str]], session_id: str, *, wait: bool = False, **options: Any
    ) -> str:
        """Produces the request and returns its id once the broker has it.

        Raises QueueFull (before sending) when the path is full for its priority;
        `wait=True` retries with backoff until the deadline instead.
        """
        request = self.build_request(messages, session_id, **options)
        await self._admit(request, wait)
        await self._produce(request)
        return str(request["request_id"])

    async def generate(
        self, messages: list[dict[str, str]], session_id: str, *, wait: bool = False, **options: Any
    ) -> Reply:
        """Produces the request and waits for its reply (any status) until the deadline.

        Raises QueueFull as `submit` does, and ReplyTimeout when no reply came in time.
        """
        request = self.build_request(messages, session_id, **options)
        assert self._loop is not None, "use `async with Client(...)`"
        await self._admit(request, wait)
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._pending[request["request_id"]] = future
        try:
            await self._produce(request)
            wait_s = (request["deadline_ms"] - now_ms()) / 1000 + self.reply_grace_s if request["deadline_ms"] else None
            try:
                return await asyncio.wait_for(future, wait_s)
            except TimeoutError as exc:
                raise ReplyTimeout(f"no reply to {request['request_id']} before its deadline") from exc
        finally:
            self._pending.pop(request["request_id"], None)

    async def _produce(self, request: dict[str, Any]) -> None:
        value = self.codec.encode("InferenceRequest", request)
        record = Outgoing(
            self.settings.topics.requests, request["session_id"].encode(), value, [content_type_header(AVRO)]
        )
        await self._producer.send_all([record])


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
