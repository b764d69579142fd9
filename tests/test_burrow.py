"""Burrow's rules over a window of samples (ops/burrow.py), and the commit log's parser."""

from __future__ import annotations

import struct

from ops.burrow import ERR, OK, REWIND, STALL, STOP, WARN, GroupHealth
from ops.commit_log import parse_commit

WINDOW = 10.0


def health(samples: list[tuple[float, int, int]], commit_times: list[float | None] | None = None) -> GroupHealth:
    """One partition's (at, committed, lag) samples."""
    group = GroupHealth(WINDOW)
    for i, (at, committed, lag) in enumerate(samples):
        times = None if commit_times is None or commit_times[i] is None else {0: commit_times[i]}
        group.add(at, {0: committed}, {0: lag}, times)
    return group


def test_a_group_that_catches_up_or_touches_zero_is_ok() -> None:
    assert health([(0, 10, 50), (5, 40, 30), (10, 80, 5)]).statuses(10) == {0: OK}
    assert health([(0, 10, 0), (5, 10, 3), (10, 12, 9)]).statuses(10) == {0: OK}


def test_offsets_moving_while_lag_never_shrinks_is_warn() -> None:
    group = health([(0, 10, 50), (5, 20, 60), (10, 30, 70)])
    assert group.statuses(10) == {0: WARN} and group.stage_status(10) == WARN


def test_no_commit_for_longer_than_the_window_is_stop() -> None:
    group = health([(0, 10, 50), (6, 10, 55), (12, 10, 60)])
    assert group.statuses(12) == {0: STOP} and group.stage_status(12) == ERR


def test_commits_of_the_same_offset_with_lag_are_a_stall() -> None:
    # the commit log shows commits all along, but the offset never moves
    samples = [(0, 10, 50), (6, 10, 55), (12, 10, 60)]
    group = health(samples, commit_times=[0, 6, 12])
    assert group.statuses(12) == {0: STALL} and group.stage_status(12) == ERR
    assert health(samples).statuses(12) == {0: STOP}  # without the commit log: no commit seen


def test_an_offset_moving_back_is_a_rewind() -> None:
    group = health([(0, 40, 10), (5, 20, 30), (10, 25, 25)])
    assert group.statuses(10) == {0: REWIND} and group.stage_status(10) == ERR


def test_a_commit_record_of_consumer_offsets_is_parsed() -> None:
    def string(text: str) -> bytes:
        return struct.pack(">h", len(text)) + text.encode()

    key = struct.pack(">h", 1) + string("workers") + string("t.contexts") + struct.pack(">i", 3)
    value = struct.pack(">hqi", 3, 1234, 7) + string("") + struct.pack(">q", 1_700_000_000_000)
    commit = parse_commit(key, value)
    assert commit is not None
    assert (commit.group, commit.topic, commit.partition, commit.offset) == ("workers", "t.contexts", 3, 1234)
    assert commit.committed_ms == 1_700_000_000_000
    assert parse_commit(struct.pack(">h", 2) + string("g"), b"\x00\x00") is None  # group metadata
    assert parse_commit(key, None) is None  # a tombstone
