"""A confluent-kafka producer whose deliveries asyncio code can await.

`send_all` hands every record to librdkafka (its C threads batch and send them,
outside the GIL) and returns once the broker acknowledged all of them: a stage
commits its input only after that. One thread of ours serves the delivery reports
and wakes the awaiting coroutine once per call, not once per record.

Used by the processors (where it replaced faust's aiokafka producer: the
processors' send path was about 13% of a busy processor in py-spy, docs/internals.md)
and by the client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from streams.exceptions import TidegateError
from streams.outgoing import Outgoing

log = logging.getLogger(__name__)

QUEUE_FULL_WAIT_S = 0.005  # librdkafka's local queue is full: wait for deliveries to drain it

# The broker (or librdkafka) refuses this record whatever the retries: sending it
# again would stall its stage forever, so its fallback (a dead letter) goes instead.
REFUSED_FOR_GOOD = frozenset(
    {
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError._INVALID_ARG,
    }
)


def refused_for_good(err: KafkaError) -> bool:
    return err.code() in REFUSED_FOR_GOOD


def instead_of(record: Outgoing, error: str) -> Outgoing | None:
    """The record's fallback, with the broker's refusal added to its headers."""
    if record.fallback is None:
        return None
    fallback = record.fallback
    return dataclasses.replace(fallback, headers=[*fallback.headers, ("delivery.error", error.encode()[:1000])])


class DeliveryFailed(TidegateError):
    """The broker did not take a record; names its topic and the broker's error."""


class RefusedForGood(DeliveryFailed):
    """The broker refuses the record whatever the retries (REFUSED_FOR_GOOD) and it
    has no fallback: the caller's to answer (a client: its request is too large)."""

    def __init__(self, topic: str, error: KafkaError) -> None:
        super().__init__(f"{topic}: {error.str()}")
        self.too_large = error.code() in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)


class DeliveryProducer:
    """:param config: librdkafka producer settings (streams.kafka.producer_config)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._producer: Producer | None = None  # connects in start(), not here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Connects and starts the report thread (once); `send_all` calls it if nobody
        did, but start early where the first batch's latency matters: an idempotent
        producer's first send waits for its producer id."""
        if self._producer is not None:
            return
        self._producer = Producer(self._config)
        self._thread = threading.Thread(target=self._serve_reports, name="tidegate-delivery", daemon=True)
        self._thread.start()

    def _serve_reports(self) -> None:
        assert self._producer is not None
        while not self._stop.is_set():
            self._producer.poll(0.1)  # runs the delivery callbacks, in this thread

    async def send_all(self, records: Sequence[Outgoing]) -> None:
        """Produces `records` and waits until the broker acknowledged every one. A
        record refused for good (REFUSED_FOR_GOOD) is replaced by its fallback; raises
        DeliveryFailed naming the first record that failed otherwise, or that was
        refused for good with no fallback."""
        pending = list(records)
        while pending:
            refused = await self._send_once(pending)
            pending = []
            for record, error in refused:
                fallback = instead_of(record, error.str())
                if fallback is None:
                    raise RefusedForGood(record.topic, error)
                log.warning(
                    "%s refused for good (%s); sending its fallback to %s", record.topic, error.str(), fallback.topic
                )
                pending.append(fallback)

    async def _send_once(self, records: Sequence[Outgoing]) -> list[tuple[Outgoing, KafkaError]]:
        """Sends `records`; returns those refused for good with the broker's error,
        raises DeliveryFailed if any other failed."""
        if self._producer is None:
            self.start()  # connects on first use
        assert self._producer is not None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        remaining = len(records)
        failures: list[str] = []
        refused: list[tuple[Outgoing, KafkaError]] = []
        lock = threading.Lock()  # a record refused inside produce() is counted here, not in the report thread

        def failed(record: Outgoing, err: KafkaError) -> None:
            if refused_for_good(err):
                refused.append((record, err))
            else:
                failures.append(f"{record.topic}: {err.str()}")

        def on_delivery(err: KafkaError | None, _message: Any, record: Outgoing) -> None:
            nonlocal remaining
            with lock:
                if err is not None:
                    failed(record, err)
                remaining -= 1
                last = remaining == 0
            if last:
                loop.call_soon_threadsafe(_settle, done, failures)

        for record in records:
            while True:
                try:
                    self._producer.produce(
                        record.topic,
                        record.value,
                        record.key,
                        headers=record.headers,
                        on_delivery=lambda err, msg, record=record: on_delivery(err, msg, record),
                    )
                    break
                except BufferError:
                    await asyncio.sleep(QUEUE_FULL_WAIT_S)
                except KafkaException as exc:  # refused before it left: too large, say
                    on_delivery(exc.args[0], None, record)
                    break
        await done
        return refused

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        """The broker's metadata, on this producer's connection (streams/reply_topics.py)."""
        self.start()
        assert self._producer is not None
        return self._producer.list_topics(topic, timeout=timeout)

    def close(self, timeout_s: float = 10.0) -> None:
        """Delivers what is queued (up to `timeout_s`), then stops the report thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._producer is not None:
            self._producer.flush(timeout_s)


def _settle(future: asyncio.Future[None], failures: list[str]) -> None:
    if future.done():
        return
    if failures:
        future.set_exception(DeliveryFailed(f"{len(failures)} record(s) not delivered; first: {failures[0]}"))
    else:
        future.set_result(None)
