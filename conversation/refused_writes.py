"""Writes Redis refused while it answers: counted, and logged once per interval.

Past `maxmemory` with nothing left that `volatile-lru` may evict (every key with a
TTL gone, the rest claims, marks, quota buckets and data of others), Redis refuses
every write with OOM while it still serves reads. The stage is not "unreachable":
reads go on, and each refused write is its own command's loss (a claim not taken:
the request would be forwarded again if redelivered; an assistant turn or answered
mark not written). Silent, that state looks healthy; one line per command floods
the log. So each refusal counts on `tidegate_redis_write_refusals{stage}` and one
line per LOG_INTERVAL_S says how many, what was refused, and Redis's words.
"""

from __future__ import annotations

import logging
import time

from streams import metrics

LOG_INTERVAL_S = 10.0


class RefusedWrites:
    def __init__(self, stage: str, log: logging.Logger, interval_s: float = LOG_INTERVAL_S) -> None:
        self.stage = stage
        self.log = log
        self.interval_s = interval_s
        self._unlogged = 0
        self._next_log = 0.0

    def note(self, what: str, error: BaseException, count: int = 1) -> None:
        """`count` writes of `what` refused with `error`."""
        metrics.REDIS_WRITE_REFUSALS.labels(self.stage).inc(count)
        self._unlogged += count
        now = time.monotonic()
        if now < self._next_log:
            return
        self.log.warning(
            "redis refuses writes: %d refused since the last such line (at most one per %.0fs; now: %s): %s%s",
            self._unlogged,
            self.interval_s,
            what,
            error,
            " (past maxmemory with nothing evictable: raise maxmemory or free memory)"
            if "maxmemory" in str(error)
            else "",
        )
        self._unlogged = 0
        self._next_log = now + self.interval_s
