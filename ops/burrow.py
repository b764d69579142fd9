"""A consumer group's health per partition, by Burrow's rules, over a window of samples.

The lag monitor samples each partition's committed offset and lag every interval
and keeps the samples of the last `window_s`. A partition is:

- OK: no lag at some point in the window, or the lag shrank over it;
- WARN: the committed offset moves, but the lag never shrinks (the group keeps up
  with nothing: it falls behind or holds);
- STALL: the group commits, but the committed offset did not move over the
  window, with lag (alive and stuck);
- STOP: no commit for longer than the window spans, with lag (the group is gone,
  or its members hang) — checked before STALL. When the commit log is readable
  (ops/commit_log.py, Apache Kafka) a commit is any commit, the same offset again
  included; otherwise it is a move of the committed offset;
- REWIND: the committed offset moved backwards within the window.

A stage is ERR when any partition is STOP, STALL or REWIND, WARN when any is WARN,
else OK. Until the window holds two samples a partition is OK.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

OK, WARN, STALL, STOP, REWIND = "OK", "WARN", "STALL", "STOP", "REWIND"
ERR = "ERR"
ERRORS = frozenset({STALL, STOP, REWIND})
STAGE_CODES = {OK: 0, WARN: 1, ERR: 2}


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # wall-clock seconds
    committed: int
    lag: int
    last_commit_at: float | None = None  # from the commit log, when known


class PartitionWindow:
    """The samples of one partition within the window, and when its commit last moved."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.samples: collections.deque[Sample] = collections.deque()
        self.last_move_at: float | None = None
        self.last_commit_at: float | None = None

    def add(self, sample: Sample) -> None:
        if (self.samples and sample.committed != self.samples[-1].committed) or self.last_move_at is None:
            self.last_move_at = sample.at
        if sample.last_commit_at is not None:
            self.last_commit_at = max(self.last_commit_at or 0.0, sample.last_commit_at)
        self.samples.append(sample)
        while len(self.samples) > 2 and self.samples[1].at <= sample.at - self.window_s:
            self.samples.popleft()

    def status(self, now: float) -> str:
        if len(self.samples) < 2:
            return OK
        samples = list(self.samples)
        if any(b.committed < a.committed for a, b in itertools.pairwise(samples)):
            return REWIND
        first, last = samples[0], samples[-1]
        if any(s.lag == 0 for s in samples):
            return OK
        committed_at = max((t for t in (self.last_move_at, self.last_commit_at) if t is not None), default=None)
        if committed_at is not None and now - committed_at > self.window_s:
            return STOP
        if last.committed == first.committed:
            return STALL
        if last.lag < first.lag:
            return OK
        return WARN


class GroupHealth:
    """Burrow's evaluation of one stage's group, partition by partition."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.partitions: dict[str, PartitionWindow] = {}  # by partition label (streams/lag.py Stage.label)

    def add(
        self, at: float, committed: dict[str, int], lags: dict[str, int], commit_times: dict[str, float] | None = None
    ) -> None:
        """One sample of every partition: committed offsets, lags, and (when the commit
        log is read) the wall-clock time of each partition's last commit. A partition
        not in the sample is no longer the stage's (a tenant's topic deleted): forgotten."""
        for gone in set(self.partitions) - set(lags):
            del self.partitions[gone]
        for partition, lag in lags.items():
            window = self.partitions.setdefault(partition, PartitionWindow(self.window_s))
            window.add(Sample(at, committed.get(partition, -1), lag, (commit_times or {}).get(partition)))

    def statuses(self, now: float) -> dict[str, str]:
        return {p: w.status(now) for p, w in sorted(self.partitions.items())}

    def stage_status(self, now: float) -> str:
        found = set(self.statuses(now).values())
        if found & ERRORS:
            return ERR
        return WARN if WARN in found else OK
