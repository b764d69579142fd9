"""Commit positions when records finish out of order (continuous batching)."""

from __future__ import annotations

from inference.offsets import OffsetLedger
from tests.test_batcher import Record


def Rec(off: int, part: int = 0) -> Record:
    return Record(0, part, off)


def test_commit_never_passes_an_open_record() -> None:
    ledger = OffsetLedger()
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
    ledger = OffsetLedger()
    ledger.take([Rec(3), Rec(0, part=1)])
    ledger.answered("t", 0, 3)
    assert ledger.positions({("t", 0): 2}) == {("t", 0): 2}
    ledger.answered("t", 1, 0)
    assert ledger.positions({}) == {("t", 0): 4, ("t", 1): 1}


def test_forgotten_partitions_are_not_committed() -> None:
    ledger = OffsetLedger()
    ledger.take([Rec(1)])
    ledger.answered("t", 0, 1)
    ledger.forget([("t", 0)])
    assert ledger.positions({}) == {}
