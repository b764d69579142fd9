"""Batch formation: closes on count or on max wait, whichever comes first."""

from __future__ import annotations

import time

from inference.batcher import Batcher


class FakeSource:
    """Yields records at fixed times; consume() behaves like confluent's (waits for n or timeout)."""

    def __init__(self, arrivals_s: list[float]) -> None:
        self.start = time.monotonic()
        self.arrivals = list(arrivals_s)

    def consume(self, n: int, timeout_s: float) -> list[float]:
        deadline = time.monotonic() + timeout_s
        got: list[float] = []
        while len(got) < n:
            now = time.monotonic() - self.start
            while self.arrivals and self.arrivals[0] <= now and len(got) < n:
                got.append(self.arrivals.pop(0))
            if len(got) >= n or time.monotonic() >= deadline:
                break
            time.sleep(0.001)
        return got


def test_batch_closes_when_full() -> None:
    source = FakeSource([0.0] * 10)
    batch = Batcher(max_batch=4, max_wait_ms=1000).collect(source.consume)
    assert len(batch) == 4


def test_batch_closes_at_max_wait_after_the_first_record() -> None:
    source = FakeSource([0.0, 0.01, 0.5])
    started = time.monotonic()
    batch = Batcher(max_batch=8, max_wait_ms=100).collect(source.consume)
    assert len(batch) == 2
    assert time.monotonic() - started < 0.4


def test_idle_source_returns_empty_after_idle_poll() -> None:
    assert Batcher(max_batch=8, max_wait_ms=10, idle_poll_s=0.05).collect(FakeSource([]).consume) == []
