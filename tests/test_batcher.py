"""Batch formation: count or max wait, oldest first, bounded pool with pause/resume."""

from __future__ import annotations

import time
from dataclasses import dataclass

from inference.batcher import Batcher, select_batch


@dataclass
class Record:
    ts: int
    part: int
    off: int

    def timestamp(self) -> tuple[int, int]:
        return (1, self.ts)

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return self.part

    def offset(self) -> int:
        return self.off


class FakeSource:
    """Records arrive at fixed times; consume() waits for n or the timeout, like confluent's,
    and, like a broker, returns the lowest partitions first. Paused partitions yield nothing."""

    def __init__(self, arrivals: list[tuple[float, Record]], partitions: int = 3) -> None:
        self.start = time.monotonic()
        self.arrivals = list(arrivals)
        self.partitions = partitions
        self.paused: set[int] = set()
        self.pauses = 0

    def consume(self, n: int, timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        got: list[Record] = []
        while len(got) < n:
            now = time.monotonic() - self.start
            ready = [a for a in self.arrivals if a[0] <= now and a[1].part not in self.paused]
            for arrival in sorted(ready, key=lambda a: (a[1].part, a[1].off))[: n - len(got)]:
                self.arrivals.remove(arrival)
                got.append(arrival[1])
            if len(got) >= n or time.monotonic() >= deadline:
                break
            time.sleep(0.001)
        return got

    def pause(self, partitions: list) -> None:
        self.paused |= {tp.partition for tp in partitions}
        self.pauses += 1

    def resume(self, partitions: list) -> None:
        self.paused -= {tp.partition for tp in partitions}

    def assignment(self) -> list:
        return list(range(self.partitions))


def records(n: int, at: float = 0.0) -> list[tuple[float, Record]]:
    return [(at, Record(ts=i, part=i % 3, off=i // 3)) for i in range(n)]


def test_batch_closes_when_full() -> None:
    batch = Batcher(max_batch=4, max_wait_ms=1000).collect(FakeSource(records(10)))
    assert len(batch) == 4


def test_batch_closes_at_max_wait_after_the_first_record() -> None:
    source = FakeSource([(0.0, Record(0, 0, 0)), (0.01, Record(1, 0, 1)), (0.5, Record(2, 0, 2))])
    started = time.monotonic()
    batch = Batcher(max_batch=8, max_wait_ms=100).collect(source)
    assert len(batch) == 2
    assert time.monotonic() - started < 0.4


def test_idle_source_returns_empty_after_idle_poll() -> None:
    assert Batcher(max_batch=8, max_wait_ms=10, idle_poll_s=0.05).collect(FakeSource([])) == []


def test_oldest_records_first_across_partitions() -> None:
    # partition 0 comes first from the broker, but partition 2 holds the oldest records
    arrivals = [(0.0, Record(ts=100 + i, part=0, off=i)) for i in range(20)]
    arrivals += [(0.0, Record(ts=i, part=2, off=i)) for i in range(20)]
    batcher = Batcher(max_batch=4, max_wait_ms=10, pool_limit=12)
    batch = batcher.collect(FakeSource(arrivals))
    assert [r.ts for r in batch] == [0, 1, 2, 3]
    assert batcher.pending_offsets()[("t", 0)] == 0  # partition 0 waits, uncommitted


def test_pool_is_bounded_per_partition_and_nothing_is_lost() -> None:
    source = FakeSource(records(300))
    batcher = Batcher(max_batch=4, max_wait_ms=10, pool_limit=12)
    first = batcher.collect(source)
    assert len(first) == 4 and len(batcher.pool) == 8  # 12 fetched, then the pool is full
    assert {0, 1} <= source.paused  # partitions at their share (4) stop fetching
    seen = [r.ts for r in first]
    for _ in range(200):
        batch = batcher.collect(source)
        assert len(batcher.pool) <= 12
        seen += [r.ts for r in batch]
        if len(seen) == 300:
            break
    assert sorted(seen) == list(range(300))  # nothing lost or repeated through pauses
    # served close to oldest first: nothing overtaken by more than a pool's worth
    assert max(abs(ts - position) for position, ts in enumerate(seen)) <= 12


def test_select_batch_counts_padding_against_the_token_budget() -> None:
    lengths = {0: 100, 1: 400, 2: 110, 3: 90, 4: 105}
    pool = list(range(5))  # oldest first
    batch, rest = select_batch(pool, lengths.__getitem__, max_count=8, token_budget=450)
    # 4 rows x 110 = 440 fits; adding the 400-token prompt would make it 5 x 400
    assert batch == [0, 2, 3, 4] and rest == [1]


def test_select_batch_always_takes_the_oldest_even_over_budget() -> None:
    lengths = {0: 900, 1: 10, 2: 10}
    batch, rest = select_batch([0, 1, 2], lengths.__getitem__, max_count=8, token_budget=500)
    assert batch == [0] and rest == [1, 2]


def test_select_batch_groups_similar_lengths_and_ignores_free_records() -> None:
    lengths = {0: 50, 1: 480, 2: 60, 3: 0, 4: 490, 5: 55}
    batch, rest = select_batch(list(range(6)), lengths.__getitem__, max_count=3, token_budget=10_000)
    assert batch == [0, 3, 5] or batch == [0, 2, 5] or batch == [0, 3, 2]
    assert 1 in rest and 4 in rest  # the long prompts wait for a batch of their own


def test_token_budget_closes_a_batch_before_max_wait() -> None:
    source = FakeSource([(0.0, Record(0, 0, i)) for i in range(10)])
    batcher = Batcher(max_batch=16, max_wait_ms=2000, token_budget=300, cost=lambda _r: 100)
    started = time.monotonic()
    batch = batcher.collect(source)
    assert len(batch) == 3 and time.monotonic() - started < 1.0


def test_without_linger_a_lone_record_is_taken_without_waiting_out_the_window() -> None:
    source = FakeSource([(0.0, Record(0, 0, 0)), (3.0, Record(1, 0, 1))])
    started = time.monotonic()
    batch = Batcher(max_batch=8, max_wait_ms=5_000).collect(source, linger=False)
    assert [r.offset() for r in batch] == [0]
    assert time.monotonic() - started < 1.0  # neither the 5 s window nor the later record waited for
