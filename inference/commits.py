"""Replies out, offsets in: a record is committed only once the broker has its answer.

`ReplyCommitter` produces each reply (or dead letter) with a delivery callback
that marks its record answered in the `OffsetLedger` (inference/offsets.py);
`commit` then moves each partition's position up to its lowest record that is
pooled, in flight or unacknowledged. A reply the broker refused stops the worker
before anything past it is committed: its record is read again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from inference.offsets import OffsetLedger, Partition
from streams.exceptions import TidegateError
from streams.faults import fault_point
from streams.outgoing import Outgoing


class DeliveryError(TidegateError):
    """The broker did not acknowledge a reply; the batch is not committed."""


class ReplyCommitter:
    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.ledger = OffsetLedger()
        self._failures: list[str] = []

    def take(self, records: Iterable[Message]) -> None:
        """Records taken from the pool: open until their reply is acknowledged."""
        self.ledger.take(records)

    def send(self, answered: Sequence[tuple[Message, Outgoing]]) -> None:
        """Produces each reply; its record counts as answered once the broker acked it."""
        for record, o in answered:

            def on_delivery(err: KafkaError | None, _msg: Message, record: Message = record) -> None:
                if err is None:
                    self.ledger.answered(record.topic(), record.partition(), record.offset())
                else:
                    self._failures.append(str(err))

            self.producer.produce(o.topic, o.value, o.key, headers=o.headers, on_delivery=on_delivery)

    def poll(self) -> None:
        """Serves delivery reports that arrived; raises DeliveryError if a reply failed."""
        self.producer.poll(0)
        self.raise_on_failures()

    def flush(self, timeout_s: float) -> None:
        remaining = self.producer.flush(timeout_s)
        if remaining:
            self._failures.append(f"{remaining} replies unacknowledged after {timeout_s:.0f}s")
        self.raise_on_failures()

    def raise_on_failures(self) -> None:
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(f"replies not acknowledged: {failures[:3]}")

    def commit(self, consumer: Consumer, pooled: Mapping[Partition, int], asynchronous: bool) -> None:
        """Commits past answered records, never past one that is pooled or open."""
        moved = self.ledger.positions(pooled)
        if moved:
            fault_point("worker.before_commit")  # replies acknowledged, offsets not committed
            offsets = [TopicPartition(t, p, o) for (t, p), o in moved.items()]
            consumer.commit(offsets=offsets, asynchronous=asynchronous)

    def assign(self, partitions: Iterable[Partition]) -> None:
        self.ledger.assign(partitions)

    def forget(self, partitions: Iterable[Partition]) -> None:
        self.ledger.forget(partitions)
