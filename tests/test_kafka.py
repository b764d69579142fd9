"""streams/kafka.py helpers against the real broker (Apache Kafka, or Tansu)."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

from streams.kafka import consume_ready
from tests.conftest import SettingsFactory

TIMEOUT_S = 10.0


def test_consume_ready_hands_over_what_arrived_without_waiting_for_a_full_batch(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()
    topic = settings.topics.replies
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    for i in range(3):
        producer.produce(topic, f"r{i}".encode(), partition=0)
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": settings.bootstrap, "group.id": f"t-{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    try:
        started, got = time.monotonic(), []
        while len(got) < 3 and time.monotonic() - started < 3 * TIMEOUT_S:
            got += [m for m in consume_ready(consumer, 500, TIMEOUT_S) if m.error() is None]
        # consume(500, TIMEOUT_S) would hold the first 3 records until its timeout
        assert sorted(m.value() for m in got) == [b"r0", b"r1", b"r2"]
        assert time.monotonic() - started < TIMEOUT_S
    finally:
        consumer.close()
