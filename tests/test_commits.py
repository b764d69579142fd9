"""The worker's commits on a real broker, at the interleavings that could pass a record
still generating (inference/commits.py, inference/offsets.py)."""

from __future__ import annotations

from confluent_kafka import Consumer, Producer, TopicPartition

from inference.commits import ReplyCommitter
from streams.config import Settings
from streams.kafka import consumer_config, producer_config
from streams.outgoing import Outgoing
from tests.conftest import SettingsFactory
from tests.helpers import wait_for


def _fetch(consumer: Consumer, count: int) -> list:
    got: list = []

    def fetched() -> bool:
        got.extend(m for m in consumer.consume(count - len(got), 0.2) if m.error() is None)
        return len(got) >= count

    wait_for(fetched, 20, f"{count} records")
    return got


def _committed(settings: Settings, topic: str) -> int:
    probe = Consumer(consumer_config(settings, settings.worker_group))
    try:
        return probe.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    finally:
        probe.close()


def test_a_row_of_an_earlier_assignment_never_moves_the_commit_past_a_row_still_generating(
    settings_factory: SettingsFactory,
) -> None:
    """Take 40-42 (here 0-2), answer 1, revoke and reassign the partition, answer 2:
    the broker's committed offset stays at 0 while 0 generates, and the partition
    fetched again answers and commits on its own records."""
    settings = settings_factory()
    topic = settings.topics.contexts
    producer = Producer(producer_config(settings))
    for i in range(3):
        producer.produce(topic, f"r{i}".encode(), b"s", partition=0)
    producer.flush(10)
    consumer = Consumer(consumer_config(settings, settings.worker_group))
    part = [TopicPartition(topic, 0, 0)]
    consumer.assign(part)
    committer = ReplyCommitter(Producer(producer_config(settings)))

    def reply(record) -> tuple:  # type: ignore[no-untyped-def]
        return record, Outgoing(settings.topics.replies, b"s", b"reply", [])

    committer.assign([(topic, 0)])
    first = _fetch(consumer, 3)
    committer.take(first)
    committer.send([reply(first[1])])
    committer.flush(10)
    committer.commit(consumer, {}, asynchronous=False)  # what the revoke commits
    assert _committed(settings, topic) == 0
    committer.forget([(topic, 0)])  # revoked ...
    consumer.unassign()
    committer.assign([(topic, 0)])  # ... and straight back, fetched from 0 again
    consumer.assign([TopicPartition(topic, 0, 0)])
    committer.send([reply(first[2])])  # the earlier assignment's row ends now
    committer.flush(10)
    committer.commit(consumer, {}, asynchronous=False)
    assert _committed(settings, topic) == 0  # 0 is still generating: before the fix, 3
    again = _fetch(consumer, 3)
    committer.take(again)
    committer.send([reply(first[0]), reply(again[1]), reply(again[2])])
    committer.flush(10)
    committer.commit(consumer, {}, asynchronous=False)
    assert _committed(settings, topic) == 0  # this assignment's 0 has not been answered
    committer.send([reply(again[0])])
    committer.flush(10)
    committer.commit(consumer, {}, asynchronous=False)
    assert _committed(settings, topic) == 3
    consumer.close()
