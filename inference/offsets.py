"""What a worker may commit: never past a record that is not answered yet.

A record is open from the moment the worker takes it from its pool until the
broker acknowledged its reply (or dead letter). With continuous batching records
finish out of order, so a partition's commit position is its lowest open or pooled
offset, or one past the highest answered offset when none is open. Lag therefore
counts everything fetched but not answered (docs/design.md: never a commit before the
work is done).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Partition = tuple[str, int]


class OffsetLedger:
    """Positions of the partitions this member owns, and only those: a record of a
    partition revoked while it was generating may still be answered (its reply goes
    out, and the caller drops the new owner's copy), but never moves a commit: the
    new owner commits that partition from where the group left it.

    That holds when the partition comes straight back too (an eager rebalance, the
    autoscaler adding a member): the records taken before the revoke belong to the
    earlier assignment, and the partition is fetched again from its committed offset.
    A record counts as answered only if it is the very record this assignment took
    (the same fetched message, by identity), so a row of the earlier assignment that
    finishes now cannot move the new assignment's commit past a row still generating
    (take 40-42, answer 41, revoke and reassign, answer 42: no commit past 40)."""

    def __init__(self) -> None:
        self._owned: set[Partition] = set()
        self._open: dict[Partition, dict[int, Any]] = {}  # offset -> the record taken
        self._answered: dict[Partition, int] = {}  # highest answered offset
        self._committed: dict[Partition, int] = {}

    def assign(self, partitions: Iterable[Partition]) -> None:
        self._owned |= set(partitions)

    def owned_count(self) -> int:
        return len(self._owned)

    def owns(self, topic: str, partition: int) -> bool:
        return (topic, partition) in self._owned

    def take(self, records: Iterable[Any]) -> None:
        for r in records:
            key = (r.topic(), r.partition())
            if key in self._owned:
                self._open.setdefault(key, {})[r.offset()] = r

    def answered(self, record: Any) -> None:
        """`record` (as taken) has its reply acknowledged. Ignored unless this
        assignment of its partition took it: revoked meanwhile, or taken by an earlier
        assignment of a partition that came back, it is not ours to commit."""
        key = (record.topic(), record.partition())
        offset = record.offset()
        taken = self._open.get(key)
        if key not in self._owned or taken is None or taken.get(offset) is not record:
            return
        del taken[offset]
        self._answered[key] = max(self._answered.get(key, -1), offset)

    def open_count(self) -> int:
        return sum(len(offsets) for offsets in self._open.values())

    def positions(self, pooled: Mapping[Partition, int]) -> dict[Partition, int]:
        """Commit positions that moved forward since the last call; `pooled` is the
        lowest offset per partition still waiting in the batcher's pool."""
        moved: dict[Partition, int] = {}
        for key, answered in self._answered.items():
            candidates = [answered + 1, *self._open.get(key, ())]
            if key in pooled:
                candidates.append(pooled[key])
            position = min(candidates)
            if position > self._committed.get(key, -1):
                moved[key] = position
        self._committed.update(moved)
        return moved

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Revoked partitions: their new owner answers what is open."""
        for key in partitions:
            self._owned.discard(key)
            self._open.pop(key, None)
            self._answered.pop(key, None)
            self._committed.pop(key, None)
