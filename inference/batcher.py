"""Where a batch is formed, from a bounded prefetch pool, oldest first.

The worker keeps at most `pool_limit` fetched records in memory, and at most an
equal share of it per assigned partition: a partition at its share is paused
(librdkafka stops fetching it) and resumed once a batch took some of its records.
The only queue is Kafka, never an unbounded one in memory. A batch closes at
`max_batch` records or `max_wait_ms` after its first record arrived, whichever
comes first, and takes the oldest records in the pool (by record timestamp).
Since every partition's oldest records are in the pool, a backlog is served
close to first-in first-out across partitions, even though the broker returns
partitions in a fixed order (without the per-partition share, a full pool holds
only the first partitions' records and the last ones starve).

Offsets: a partition's commit position is the lowest offset still in the pool or
in flight, so a crash never skips a record that was fetched but not answered.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Protocol

from confluent_kafka import TopicPartition


class Source(Protocol):
    """The part of confluent_kafka.Consumer the batcher uses."""

    def consume(self, num_messages: int, timeout: float) -> list[Any]: ...

    def pause(self, partitions: list[Any]) -> None: ...

    def resume(self, partitions: list[Any]) -> None: ...

    def assignment(self) -> list[Any]: ...


def _age_key(record: Any) -> tuple[int, int, int]:
    return (record.timestamp()[1], record.partition(), record.offset())


class Batcher:
    def __init__(self, max_batch: int, max_wait_ms: int, pool_limit: int | None = None, idle_poll_s: float = 0.5):
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.pool_limit = max(max_batch, pool_limit or 4 * max_batch)
        self.idle_poll_s = idle_poll_s
        self.pool: list[Any] = []
        self._paused: set[tuple[str, int]] = set()
        self._share = self.pool_limit

    def collect(self, source: Source) -> list[Any]:
        """Blocks up to `idle_poll_s` for a first record, then fills the pool until
        a batch is full or `max_wait_ms` has passed; returns the oldest `max_batch`."""
        self._share = max(1, self.pool_limit // max(1, len(source.assignment())))
        self._resume_if_room(source)
        if not self.pool:
            self._add(source, source.consume(1, self.idle_poll_s))  # consume() waits for all it asks for
            if not self.pool:
                return []
        closes_at = time.monotonic() + self.max_wait_s
        while len(self.pool) < self.max_batch:
            remaining = closes_at - time.monotonic()
            if remaining <= 0:
                break
            self._add(source, source.consume(self._room(), remaining))
        while len(self.pool) < self.pool_limit:  # top up without waiting: more to choose the oldest from
            if not self._add(source, source.consume(self._room(), 0)):
                break
        self.pool.sort(key=_age_key)
        batch, self.pool = self.pool[: self.max_batch], self.pool[self.max_batch :]
        return batch

    def drop_partitions(self, partitions: set[tuple[str, int]]) -> None:
        """Forgets pooled records of revoked partitions: their new owner reads them."""
        self.pool = [r for r in self.pool if (r.topic(), r.partition()) not in partitions]
        self._paused -= partitions

    def pending_offsets(self) -> dict[tuple[str, int], int]:
        """Lowest pooled offset per partition: commits must not pass it."""
        low: dict[tuple[str, int], int] = {}
        for r in self.pool:
            key = (r.topic(), r.partition())
            low[key] = min(low.get(key, r.offset()), r.offset())
        return low

    def _counts(self) -> collections.Counter[tuple[str, int]]:
        return collections.Counter((r.topic(), r.partition()) for r in self.pool)

    def _room(self) -> int:
        """How many to ask for: one partition's share at most, since one consume()
        may return a single partition's records only."""
        return max(1, min(self.pool_limit - len(self.pool), self._share))

    def _add(self, source: Source, records: list[Any]) -> int:
        self.pool.extend(records)
        full = {key for key, n in self._counts().items() if n >= self._share} - self._paused
        if full:
            source.pause([TopicPartition(t, p) for t, p in sorted(full)])
            self._paused |= full
        return len(records)

    def _resume_if_room(self, source: Source) -> None:
        counts = self._counts()
        room = {key for key in self._paused if counts[key] < self._share}
        if room:
            source.resume([TopicPartition(t, p) for t, p in sorted(room)])
            self._paused -= room
