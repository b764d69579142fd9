"""The client's reply consumer: reads a reply topic in a thread of its own and hands
each reply and chunk to the event loop (streams/client.py).

Assigned, with no group join, at each partition's end as listed before the first
request is sent: no reply to this client's requests is missed, and none from before
it started is read. An error is logged and reading goes on (librdkafka reconnects by
itself), so the thread never dies under a caller.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas import SerializationError, get_codec
from schemas.codec import JSON_CONTENT_TYPE, content_type
from streams.config import Settings
from streams.exceptions import TidegateError
from streams.faults import fault_armed
from streams.kafka import consume_ready, consumer_config
from streams.reply import Chunk, Reply

log = logging.getLogger(__name__)


class ReplyReader:
    """:param on_reply: called on the event loop with each Reply read.
    :param on_chunk: called on the event loop with each Chunk read."""

    def __init__(
        self, settings: Settings, topic: str, on_reply: Callable[[Reply], None], on_chunk: Callable[[Chunk], None]
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.read = 0  # records read off the reply topic: the client's reply traffic
        self._on_reply = on_reply
        self._on_chunk = on_chunk
        self._codec = get_codec()
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def open(self) -> None:
        """Creates the consumer (it connects while the reply topic is being created)."""
        self._consumer = Consumer(consumer_config(self.settings, f"tidegate-client-{uuid.uuid4().hex}"))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Assigns the topic's partitions at their ends and starts reading (blocking:
        run it in a thread)."""
        assert self._consumer is not None, "open() first"
        try:
            meta = self._consumer.list_topics(self.topic, timeout=10)
        except KafkaException as exc:
            raise TidegateError(
                f"broker {self.settings.bootstrap} unreachable ({exc.args[0].str()}); is the stack up "
                "(`tidegate dev up`)?"
            ) from exc
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise TidegateError(f"reply topic {self.topic!r} not found on {self.settings.bootstrap}")
        assignment = []
        for p in topic.partitions:
            if fault_armed("reply.no_leader"):  # a topic created a moment ago (tests/test_gateway_start_backoff.py)
                raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION, "injected by TIDEGATE_FAULTS"))
            _, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10, cached=False)
            assignment.append(TopicPartition(self.topic, p, high))
        self._consumer.assign(assignment)
        self._loop = loop
        self._thread = threading.Thread(target=self._poll_loop, name="tidegate-client", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops reading and closes the consumer; safe on a reader never opened or
        started. It lets go of its callbacks too: they are the client's methods, and a
        closed reader that still held them kept its client, and the client's producer
        (librdkafka's threads and sockets), alive until a garbage collection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self._on_reply, self._on_chunk = _ignore, _ignore

    def _poll_loop(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            try:
                for message in consume_ready(self._consumer, 500, 0.05):
                    if message.error() is not None:
                        if message.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("reply consumer: %s", message.error())
                        continue
                    self.read += 1
                    self._hand_over(message.value(), message.headers())
            except Exception:
                log.exception("reply consumer failed; reading on")
                self._stop.wait(0.5)

    def _hand_over(self, value: bytes | None, headers: Any) -> None:
        """Decodes one record (a reply in the request's encoding, or an Avro chunk) and
        hands it to the loop; an undecodable one is logged and skipped."""
        assert self._loop is not None
        try:
            if content_type(headers) == JSON_CONTENT_TYPE:
                name, record = "InferenceReply", self._codec.decode_json(value, "InferenceReply")
            else:
                name, record = self._codec.decode(value)
            if name == "InferenceChunk":
                chunk = Chunk(
                    record["request_id"],
                    record["index"],
                    record["text"],
                    record["tokens_out"],
                    generation=record.get("generation", ""),
                )
                self._loop.call_soon_threadsafe(self._on_chunk, chunk)
                return
            if name != "InferenceReply":
                raise SerializationError(f"{name} on a reply topic")
            reply = Reply.from_record(record)
        except (SerializationError, TypeError, KeyError) as exc:
            log.warning("undecodable reply skipped: %s", exc)
            return
        self._loop.call_soon_threadsafe(self._on_reply, reply)


def _ignore(_item: Reply | Chunk) -> None:
    """A closed reader's callback: what it might still hand over goes nowhere."""
