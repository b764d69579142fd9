"""DeliveryProducer against the real broker (Apache Kafka, or Tansu): awaited records are on the topic,
and a record the broker never takes raises instead of passing silently."""

from __future__ import annotations

import asyncio

import pytest

from streams.delivery import DeliveryFailed, DeliveryProducer
from streams.kafka import producer_config
from streams.outgoing import Outgoing
from tests.conftest import SettingsFactory
from tests.helpers import TopicReader
from tidegate import processes


def test_send_all_returns_once_every_record_is_on_the_topic(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    topic = settings.topics.contexts
    records = [Outgoing(topic, f"s{i % 5}".encode(), f"v{i}".encode(), [("n", str(i).encode())]) for i in range(300)]
    producer = DeliveryProducer(producer_config(settings))  # not started: connects on first use
    reader = TopicReader(settings, topic)
    try:
        asyncio.run(producer.send_all(records[:1]))
        asyncio.run(producer.send_all(records[1:]))
        messages = reader.wait(lambda m: len(m) >= 300, 20, "300 records")
        assert sorted(m.value() for m in messages) == sorted(r.value for r in records)
        by_value = {m.value(): m for m in messages}
        assert by_value[b"v7"].key() == b"s2" and by_value[b"v7"].headers() == [("n", b"7")]
    finally:
        reader.close()
        producer.close()


def test_a_record_the_broker_never_takes_raises() -> None:
    closed = f"127.0.0.1:{processes.free_port()}"  # nothing listens there
    config = {"bootstrap.servers": closed, "message.timeout.ms": 300, "enable.idempotence": False}
    producer = DeliveryProducer(config)
    producer.start()
    try:
        with pytest.raises(DeliveryFailed, match=r"tidegate\.requests"):
            asyncio.run(asyncio.wait_for(producer.send_all([Outgoing("tidegate.requests", b"k", b"v")]), 10))
    finally:
        producer.close(timeout_s=0)


def test_nothing_to_send_returns_at_once() -> None:
    producer = DeliveryProducer({"bootstrap.servers": "127.0.0.1:1"})
    asyncio.run(producer.send_all([]))  # not even started: no records, no producer needed
