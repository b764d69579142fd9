"""`tidegate scale advise`'s arithmetic (ops/scaling.py)."""

from __future__ import annotations

from ops.scaling import advise, drain_time_s


def test_scale_out_to_keep_up_and_clear_the_backlog_within_the_target() -> None:
    # one member drains 50/s; 120/s arrive and 300 wait: (120 + 300 / 10) / 50 = 3
    a = advise("workers", members=1, partitions=8, arrival_rate=120, drain_rate=50, lag=300, target_s=10)
    assert a.recommended == 3 and a.change == 2 and "scale out to 3" in a.reason


def test_capped_at_the_partitions() -> None:
    a = advise("workers", members=4, partitions=8, arrival_rate=2000, drain_rate=200, lag=0, target_s=10)
    assert a.recommended == 8 and "capped at 8 partitions: add partitions" in a.reason


def test_scale_in_when_fewer_keep_up() -> None:
    a = advise("workers", members=4, partitions=8, arrival_rate=30, drain_rate=200, lag=0, target_s=10)
    assert a.recommended == 1 and "scale in" in a.reason


def test_without_a_measured_drain_rate_the_group_is_kept() -> None:
    a = advise("workers", members=2, partitions=8, arrival_rate=10, drain_rate=0, lag=5, target_s=10)
    assert a.recommended == 2 and "no drain rate" in a.reason


def test_drain_time_is_lag_over_the_net_drain() -> None:
    assert drain_time_s(100, drain_rate=30, arrival_rate=10) == 5.0
    assert drain_time_s(0, drain_rate=0, arrival_rate=0) == 0.0
    assert drain_time_s(100, drain_rate=10, arrival_rate=10) == -1.0  # never drains
