"""Where a batch is formed: up to `max_batch` records, closed at `max_wait_ms` after the first.

The only in-memory queue is librdkafka's fetch queue, bounded by the consumer
settings in `inference.worker.consumer_settings`; nothing is read ahead of the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# consume(max_records, timeout_s) -> records, as confluent_kafka.Consumer.consume
Consume = Callable[[int, float], list[Any]]


class Batcher:
    def __init__(self, max_batch: int, max_wait_ms: int, idle_poll_s: float = 0.5) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.idle_poll_s = idle_poll_s

    def collect(self, consume: Consume) -> list[Any]:
        """Blocks up to `idle_poll_s` for a first record, then fills the batch until
        it is full or `max_wait_ms` has passed since the first record."""
        batch = consume(1, self.idle_poll_s)  # consume() waits for all it asks for
        if not batch:
            return []
        closes_at = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = closes_at - time.monotonic()
            if remaining <= 0:
                break
            batch.extend(consume(self.max_batch - len(batch), remaining))
        return batch
