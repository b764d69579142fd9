"""Lag in seconds (streams/lag_seconds.py): exact from record timestamps, and
interpolated from the log end's history."""

from __future__ import annotations

from streams.lag_seconds import LagClock

P = ("t.contexts", 0)


def test_exact_age_is_the_oldest_unanswered_records_age() -> None:
    clock = LagClock()
    for offset in range(10):
        clock.record(P, offset, (100 + offset) * 1000)  # one record a second from t=100
    assert clock.exact_age(P, committed=4, log_end=10, now=120.0) == 16.0  # offset 4 written at 104
    assert clock.exact_age(P, committed=10, log_end=10, now=120.0) == 0.0  # no lag
    assert clock.exact_age(P, committed=2, log_end=10, now=120.0) is None  # forgotten once committed past


def test_interpolated_age_is_when_the_log_end_passed_the_committed_offset() -> None:
    clock = LagClock()
    clock.end(P, 0, 100.0)
    clock.end(P, 10, 110.0)  # 10 records over 10 s
    clock.end(P, 30, 120.0)
    # the end passed offset 14 (log end 15) at 112.5 s
    assert abs(clock.interpolated_age(P, committed=14, log_end=30, now=125.0) - 12.5) < 1e-9
    assert clock.interpolated_age(P, committed=30, log_end=30, now=125.0) == 0.0


def test_exact_falls_back_to_interpolated_for_records_older_than_the_reader() -> None:
    clock = LagClock()
    clock.end(P, 50, 100.0)  # the reader started at log end 50
    clock.record(P, 50, 101_000)
    exact, interpolated = clock.age(P, committed=20, log_end=51, now=110.0)
    assert exact == interpolated == 10.0  # a lower bound: older than the first sample
