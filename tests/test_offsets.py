"""Commit positions when records finish out of order (continuous batching)."""

from __future__ import annotations

from inference.offsets import OffsetLedger
from tests.test_batcher import Record


def Rec(off: int, part: int = 0) -> Record:
    return Record(0, part, off)


def owning(*partitions: int) -> OffsetLedger:
    ledger = OffsetLedger()
    ledger.assign(("t", p) for p in partitions)
    return ledger


def test_commit_never_passes_an_open_record() -> None:
    ledger = owning(0)
    ledger.take([Rec(5), Rec(6), Rec(7)])
    ledger.answered("t", 0, 7)  # the last one finished first
    assert ledger.positions({}) == {("t", 0): 5}
    ledger.answered("t", 0, 5)
    assert ledger.positions({}) == {("t", 0): 6}
    ledger.answered("t", 0, 6)
    assert ledger.positions({}) == {("t", 0): 8}
    assert ledger.positions({}) == {}  # nothing moved
    assert ledger.open_count() == 0


def test_commit_never_passes_a_pooled_record_and_partitions_are_separate() -> None:
    ledger = owning(0, 1)
    ledger.take([Rec(3), Rec(0, part=1)])
    ledger.answered("t", 0, 3)
    assert ledger.positions({("t", 0): 2}) == {("t", 0): 2}
    ledger.answered("t", 1, 0)
    assert ledger.positions({}) == {("t", 0): 4, ("t", 1): 1}


def test_forgotten_partitions_are_not_committed() -> None:
    ledger = owning(0)
    ledger.take([Rec(1)])
    ledger.answered("t", 0, 1)
    ledger.forget([("t", 0)])
    assert ledger.positions({}) == {}


def test_a_row_of_a_revoked_partition_that_finishes_later_moves_no_commit() -> None:
    """Rows keep generating through a revoke; their answers must not re-create the
    partition in the ledger, or the worker commits a partition it no longer owns
    (backwards, or past records its new owner still holds)."""
    ledger = owning(0)
    ledger.take([Rec(10), Rec(11)])
    ledger.answered("t", 0, 10)
    assert ledger.positions({}) == {("t", 0): 11}
    ledger.forget([("t", 0)])  # revoked while offset 11 was generating
    ledger.answered("t", 0, 11)  # ... and it finishes now
    assert ledger.positions({}) == {}
    ledger.assign([("t", 0)])  # assigned back later: starts from what it takes then
    ledger.take([Rec(4)])
    ledger.answered("t", 0, 4)
    assert ledger.positions({}) == {("t", 0): 5}
