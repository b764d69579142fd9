"""Lag in seconds, two ways, from what the lag reader's tail sees.

- exact: the age of the oldest record not yet committed, from record timestamps.
  The tail reads every record as it arrives; its timestamp is kept by offset until
  the group commits past it, so the record at a partition's committed offset (the
  oldest unanswered one) is known. Records older than the reader itself are not:
  for those the interpolated age stands in.
- interpolated, the way kafka-lag-exporter estimates it: the time at which the log
  end passed the group's committed offset, interpolated between samples of the log
  end over time, and its age now.

Both are 0 for a partition without lag; a stage's figure is its oldest partition's.
"""

from __future__ import annotations

import bisect
import collections

Partition = tuple[str, int]
MAX_KEPT = 200_000  # record timestamps kept per partition (a backlog far past any cap)
SAMPLE_EVERY_S = 0.25
SAMPLES_KEPT = 3600  # log-end samples per partition: 15 minutes at SAMPLE_EVERY_S


class LagClock:
    def __init__(self) -> None:
        self._stamps: dict[Partition, collections.deque[tuple[int, float]]] = {}  # (offset, seconds)
        self._ends: dict[Partition, collections.deque[tuple[float, int]]] = {}  # (seconds, log end)

    def record(self, partition: Partition, offset: int, timestamp_ms: int) -> None:
        """A record the tail read (offsets arrive in order per partition)."""
        stamps = self._stamps.setdefault(partition, collections.deque(maxlen=MAX_KEPT))
        stamps.append((offset, timestamp_ms / 1000))

    def end(self, partition: Partition, log_end: int, now: float) -> None:
        """The partition's log end at wall-clock time `now`."""
        ends = self._ends.setdefault(partition, collections.deque(maxlen=SAMPLES_KEPT))
        if ends and now - ends[-1][0] < SAMPLE_EVERY_S:
            if log_end > ends[-1][1]:
                ends[-1] = (ends[-1][0], log_end)
            return
        ends.append((now, log_end))

    def forget(self, partition: Partition) -> None:
        """Drops everything kept for a partition the reader no longer tails."""
        self._stamps.pop(partition, None)
        self._ends.pop(partition, None)

    def forget_below(self, partition: Partition, committed: int) -> None:
        """Drops the timestamps of records the group committed past."""
        stamps = self._stamps.get(partition)
        while stamps and stamps[0][0] < committed:
            stamps.popleft()

    def exact_age(self, partition: Partition, committed: int, log_end: int, now: float) -> float | None:
        """Age of the record at `committed` (the oldest unanswered), None if unseen."""
        if committed >= log_end:
            return 0.0
        self.forget_below(partition, committed)
        stamps = self._stamps.get(partition)
        if not stamps or stamps[0][0] != committed:
            return None
        return max(0.0, now - stamps[0][1])

    def interpolated_age(self, partition: Partition, committed: int, log_end: int, now: float) -> float:
        """Seconds since the log end passed `committed` (a lower bound when that was
        before the first sample)."""
        if committed >= log_end:
            return 0.0
        ends = self._ends.get(partition)
        if not ends:
            return 0.0
        values = [end for _, end in ends]
        # the first sample whose log end is past the committed offset
        i = bisect.bisect_right(values, committed)
        if i == 0:
            return max(0.0, now - ends[0][0])
        (t0, e0), (t1, e1) = ends[i - 1], ends[min(i, len(ends) - 1)]
        passed = t1 if e1 == e0 else t0 + (committed + 1 - e0) / (e1 - e0) * (t1 - t0)
        return max(0.0, now - passed)

    def age(self, partition: Partition, committed: int, log_end: int, now: float) -> tuple[float, float]:
        """(exact, interpolated) seconds for one partition; exact falls back to the
        interpolated figure for a record older than the reader."""
        interpolated = self.interpolated_age(partition, committed, log_end, now)
        exact = self.exact_age(partition, committed, log_end, now)
        return (interpolated if exact is None else exact), interpolated
