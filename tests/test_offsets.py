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
    r5, r6, r7 = Rec(5), Rec(6), Rec(7)
    ledger.take([r5, r6, r7])
    ledger.answered(r7)  # the last one finished first
    assert ledger.positions({}) == {("t", 0): 5}
    ledger.answered(r5)
    assert ledger.positions({}) == {("t", 0): 6}
    ledger.answered(r6)
    assert ledger.positions({}) == {("t", 0): 8}
    assert ledger.positions({}) == {}  # nothing moved
    assert ledger.open_count() == 0


def test_commit_never_passes_a_pooled_record_and_partitions_are_separate() -> None:
    ledger = owning(0, 1)
    r3, r0 = Rec(3), Rec(0, part=1)
    ledger.take([r3, r0])
    ledger.answered(r3)
    assert ledger.positions({("t", 0): 2}) == {("t", 0): 2}
    ledger.answered(r0)
    assert ledger.positions({}) == {("t", 0): 4, ("t", 1): 1}


def test_forgotten_partitions_are_not_committed() -> None:
    ledger = owning(0)
    r1 = Rec(1)
    ledger.take([r1])
    ledger.answered(r1)
    ledger.forget([("t", 0)])
    assert ledger.positions({}) == {}


def test_a_row_of_a_revoked_partition_that_finishes_later_moves_no_commit() -> None:
    """Rows keep generating through a revoke; their answers must not re-create the
    partition in the ledger, or the worker commits a partition it no longer owns
    (backwards, or past records its new owner still holds)."""
    ledger = owning(0)
    r10, r11 = Rec(10), Rec(11)
    ledger.take([r10, r11])
    ledger.answered(r10)
    assert ledger.positions({}) == {("t", 0): 11}
    ledger.forget([("t", 0)])  # revoked while offset 11 was generating
    ledger.answered(r11)  # ... and it finishes now
    assert ledger.positions({}) == {}
    ledger.assign([("t", 0)])  # assigned back later: starts from what it takes then
    r4 = Rec(4)
    ledger.take([r4])
    ledger.answered(r4)
    assert ledger.positions({}) == {("t", 0): 5}


def test_a_row_of_an_earlier_assignment_moves_no_commit_when_the_partition_comes_straight_back() -> None:
    """Take 40-42, answer 41, revoke and reassign (an eager rebalance), answer 42:
    the commit must not pass 40, which is still generating (a kill would lose it).
    The new assignment fetches 40-42 again from the committed offset; only its own
    records move its commits."""
    ledger = owning(0)
    r40, r41, r42 = Rec(40), Rec(41), Rec(42)
    ledger.take([r40, r41, r42])
    ledger.answered(r41)
    assert ledger.positions({}) == {("t", 0): 40}  # committed at the revoke
    ledger.forget([("t", 0)])
    ledger.assign([("t", 0)])
    ledger.answered(r42)  # a row of the earlier assignment ends before the refetch
    assert ledger.positions({}) == {}
    again = [Rec(40), Rec(41), Rec(42)]  # the same offsets, fetched again
    ledger.take(again)
    ledger.answered(r40)  # the earlier assignment's 40 ends: not this assignment's record
    assert ledger.positions({}) == {}
    ledger.answered(again[1])
    ledger.answered(again[2])
    assert ledger.positions({}) == {("t", 0): 40}  # its own 40 still generating
    ledger.answered(again[0])
    assert ledger.positions({}) == {("t", 0): 43}
