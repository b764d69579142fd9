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
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, Producer

from streams.exceptions import TidegateError
from streams.outgoing import Outgoing

QUEUE_FULL_WAIT_S = 0.005  # librdkafka's local queue is full: wait for deliveries to drain it


class DeliveryFailed(TidegateError):
    """The broker did not take a record; names its topic and the broker's error."""


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
        """Produces `records` and waits until the broker acknowledged every one;
        raises DeliveryFailed naming the first that failed."""
        if not records:
            return
        if self._producer is None:
            self.start()  # connects on first use
        assert self._producer is not None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        remaining = len(records)
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, message: Any) -> None:
            # every callback runs in the report thread: `remaining` has one writer
            nonlocal remaining
            if err is not None:
                failures.append(f"{message.topic()}: {err.str()}")
            remaining -= 1
            if remaining == 0:
                loop.call_soon_threadsafe(_settle, done, failures)

        for record in records:
            while True:
                try:
                    self._producer.produce(
                        record.topic, record.value, record.key, headers=record.headers, on_delivery=on_delivery
                    )
                    break
                except BufferError:
                    await asyncio.sleep(QUEUE_FULL_WAIT_S)
        await done

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
