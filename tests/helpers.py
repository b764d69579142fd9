"""Test helpers: bounded waits and reading whole topics from the real broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from streams.config import Settings
from streams.lag import LagReader, pipeline_stages


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Returns check()'s first truthy value; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def wait_for_stage_lag(settings: Settings, stage_name: str, expected: int, timeout_s: float) -> None:
    """Waits until a pipeline stage's lag (log end - committed) is `expected`."""
    stage = next(s for s in pipeline_stages(settings) if s.name == stage_name)
    reader = LagReader(settings, [stage])
    try:

        def lag_now() -> int:
            reader.poll(0.1)
            return reader.lag(stage).lag

        wait_for(lambda: lag_now() == expected, timeout_s, f"{stage_name}' lag == {expected}")
    finally:
        reader.close()


class TopicReader:
    """Reads a topic from the beginning, all partitions, without a group join."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.messages: list[Any] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap,
                "group.id": f"test-reader-{time.monotonic_ns()}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 25,
            }
        )
        meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])

    def poll(self) -> list[Any]:
        for m in self._consumer.consume(1000, 0.1):
            if m.error() is None:
                self.messages.append(m)
            elif m.error().code() != KafkaError._PARTITION_EOF:
                raise AssertionError(str(m.error()))
        return self.messages

    def wait(self, predicate: Callable[[list[Any]], bool], timeout_s: float, what: str) -> list[Any]:
        wait_for(lambda: predicate(self.poll()), timeout_s, what)
        return self.messages

    def close(self) -> None:
        self._consumer.close()
