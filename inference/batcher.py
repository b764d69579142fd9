"""Where a batch is formed, from a bounded prefetch pool, oldest first.

The worker keeps at most `pool_limit` fetched records in memory, and at most an
equal share of it per assigned partition: a partition at its share is paused
(librdkafka stops fetching it) and resumed once a batch took some of its records.
The only queue is Kafka, never an unbounded one in memory. A batch closes at
`max_batch` records, at `token_budget` tokens counting padding (rows times the
longest prompt), or `max_wait_ms` after its first record arrived, whichever comes
first. It always holds the oldest record in the pool (by record timestamp); the
rest are the pooled records closest to it in length, so that little is padding
(`select_batch`).
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
from collections.abc import Callable
from typing import Any, Protocol

from confluent_kafka import TopicPartition


class Source(Protocol):
    """The part of confluent_kafka.Consumer the batcher uses."""

    def consume(self, num_messages: int, timeout: float) -> list[Any]: ...

    def pause(self, partitions: list[Any]) -> None: ...

    def resume(self, partitions: list[Any]) -> None: ...

    def assignment(self) -> list[Any]: ...


FILL_SLICE_S = 0.005


def _age_key(record: Any) -> tuple[int, int, int]:
    return (record.timestamp()[1], record.partition(), record.offset())


def select_batch(
    pool: list[Any], cost: Callable[[Any], int], max_count: int, token_budget: int
) -> tuple[list[Any], list[Any]]:
    """Picks a batch from `pool` (oldest first): the oldest record, then the records
    nearest to it in prompt length while rows x longest prompt stays within
    `token_budget` (the oldest goes alone if it is over it by itself). Records of
    cost 0 (no model needed: expired, undecodable) never count against the budget.
    Returns (batch, rest), both oldest first."""
    if not pool or max_count <= 0:
        return [], pool
    anchor = cost(pool[0])
    order = sorted(range(1, len(pool)), key=lambda i: (abs(cost(pool[i]) - anchor), i))
    chosen, rows, longest = [0], (1 if anchor else 0), anchor
    for i in order:
        if len(chosen) >= max_count:
            break
        c = cost(pool[i])
        if c and (rows + 1) * max(longest, c) > token_budget:
            continue
        chosen.append(i)
        if c:
            rows, longest = rows + 1, max(longest, c)
    picked = set(chosen)
    return [pool[i] for i in sorted(picked)], [r for i, r in enumerate(pool) if i not in picked]


class Batcher:
    def __init__(
        self,
        max_batch: int,
        max_wait_ms: int,
        pool_limit: int | None = None,
        idle_poll_s: float = 0.5,
        token_budget: int | None = None,
        cost: Callable[[Any], int] | None = None,
        on_fetch: Callable[[list[Any]], None] | None = None,
    ):
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.token_budget = token_budget or 1 << 62
        self.cost = cost or (lambda _record: 1)
        # sees each fetch's records before they are pooled (and costed): the worker
        # decodes them together, one reply_to listing per fetch (inference/jobs.py)
        self.on_fetch = on_fetch
        self.pool_limit = max(max_batch, pool_limit or 4 * max_batch)
        self.idle_poll_s = idle_poll_s
        self.pool: list[Any] = []
        self._paused: set[tuple[str, int]] = set()
        self._share = self.pool_limit

    def collect(self, source: Source, room: int | None = None, wait: bool = True, linger: bool = True) -> list[Any]:
        """Blocks up to `idle_poll_s` for a first record, then fills the pool until
        a batch is full or `max_wait_ms` has passed; returns a batch of at most `room`
        (default `max_batch`) records. `wait=False` (continuous batching, while the
        model is busy) takes what is pooled or already fetched, without waiting.
        `linger=False` (continuous batching, idle engine) returns once a first record
        is in, with whatever else is already fetched: later ones join the running
        batch at its next step, so a lone request does not wait out the window."""
        room = self.max_batch if room is None else min(room, self.max_batch)
        self._share = max(1, self.pool_limit // max(1, len(source.assignment())))
        self._resume_if_room(source)
        if not wait:
            self._top_up(source)
            return self._take(room)
        if not self.pool:
            self._add(source, source.consume(1, self.idle_poll_s))  # consume() waits for all it asks for
            if not self.pool:
                return []
        closes_at = time.monotonic() + (self.max_wait_s if linger else 0.0)
        while len(self.pool) < room and sum(map(self.cost, self.pool)) < self.token_budget:
            remaining = closes_at - time.monotonic()
            if remaining <= 0:
                break
            # short slices: consume() waits for all it asks for, and the token budget
            # may be reached before the count is
            self._add(source, source.consume(self._room(), min(remaining, FILL_SLICE_S)))
        self._top_up(source)
        return self._take(room)

    def _top_up(self, source: Source) -> None:
        """Fetches what librdkafka already holds, without waiting: more to choose from.
        `on_fetch` sees all of it at once (nothing is costed before the batch is taken)."""
        fetched: list[Any] = []
        while len(self.pool) < self.pool_limit:
            records = source.consume(self._room(), 0)
            if not self._add(source, records, notify=False):
                break
            fetched.extend(records)
        if fetched and self.on_fetch is not None:
            self.on_fetch(fetched)

    def _take(self, room: int) -> list[Any]:
        self.pool.sort(key=_age_key)
        batch, self.pool = select_batch(self.pool, self.cost, room, self.token_budget)
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

    def _add(self, source: Source, records: list[Any], notify: bool = True) -> int:
        if records and notify and self.on_fetch is not None:
            self.on_fetch(records)
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
