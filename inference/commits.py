"""Replies out, offsets in: a record is committed only once the broker has its answer.

`ReplyCommitter` produces each reply (or dead letter) with a delivery callback
that marks its record answered in the `OffsetLedger` (inference/offsets.py);
`commit` then moves each partition's position up to its lowest record that is
pooled, in flight or unacknowledged. A reply the broker refused for good (its
topic gone or not writable, say) is replaced by its fallback, the record's dead
letter (streams/delivery.py); any other refusal stops the worker before anything
past it is committed: its record is read again. A reply not acknowledged yet is no
failure: its record stays open and the worker waits on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from inference.offsets import OffsetLedger, Partition
from streams.delivery import instead_of, refused_for_good
from streams.exceptions import TidegateError
from streams.faults import fault_point
from streams.outgoing import Outgoing

log = logging.getLogger(__name__)


class DeliveryError(TidegateError):
    """The broker did not acknowledge a reply; the batch is not committed."""


class ReplyCommitter:
    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.ledger = OffsetLedger()
        self._failures: list[str] = []
        self._fallbacks: list[tuple[Message, Outgoing]] = []  # refused for good: send these instead

    def take(self, records: Iterable[Message]) -> None:
        """Records taken from the pool: open until their reply is acknowledged."""
        self.ledger.take(records)

    def send(self, answered: Sequence[tuple[Message, Outgoing]]) -> None:
        """Produces each reply; its record counts as answered once the broker acked it."""
        for record, o in answered:
            self._produce(record, o)

    def _produce(self, record: Message, o: Outgoing) -> None:
        def on_delivery(err: KafkaError | None, _msg: Message | None) -> None:
            if err is None:
                self.ledger.answered(record)
                return
            fallback = instead_of(o, err.str()) if refused_for_good(err) else None
            if fallback is None:
                self._failures.append(f"{o.topic}: {err.str()}")
            else:
                self._fallbacks.append((record, fallback))

        try:
            self.producer.produce(o.topic, o.value, o.key, headers=o.headers, on_delivery=on_delivery)
        except KafkaException as exc:  # refused before it left: too large, say
            on_delivery(exc.args[0], None)

    def _send_fallbacks(self) -> bool:
        fallbacks, self._fallbacks = self._fallbacks, []
        for record, o in fallbacks:
            log.warning("reply to %s refused for good; dead-lettering its record instead", record.topic())
            self._produce(record, o)
        return bool(fallbacks)

    def poll(self) -> None:
        """Serves delivery reports that arrived; raises DeliveryError if a reply failed."""
        self.producer.poll(0)
        self._send_fallbacks()
        self.raise_on_failures()

    def flush(self, timeout_s: float) -> int:
        """Waits up to `timeout_s` for the broker to acknowledge the replies sent (and
        the fallbacks of those refused for good); returns how many are still waiting.
        A broker slow to answer (a leader election, a broker stopped for seconds) is
        not a failure: an unacknowledged reply's record stays open in the ledger, so
        no commit passes it, and librdkafka goes on delivering it. Only a delivery that
        failed (its report says so, at the latest after librdkafka's message timeout)
        raises DeliveryError. Raising as soon as a flush ran out made an idle worker
        exit on a leader election."""
        remaining = self.producer.flush(timeout_s)
        while self._send_fallbacks():  # a fallback has none of its own: this ends
            remaining = self.producer.flush(timeout_s)
        if remaining:
            log.warning(
                "%d replies not acknowledged after %.0fs; waiting on, committing only what is", remaining, timeout_s
            )
        self.raise_on_failures()
        return remaining

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
