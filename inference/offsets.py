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
    new owner commits that partition from where the group left it."""

    def __init__(self) -> None:
        self._owned: set[Partition] = set()
        self._open: dict[Partition, set[int]] = {}
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
                self._open.setdefault(key, set()).add(r.offset())

    def answered(self, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        if key not in self._owned:
            return  # revoked meanwhile: not ours to commit
        self._open.get(key, set()).discard(offset)
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
