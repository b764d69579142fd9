"""Pressure states, hysteresis and admission by priority (pure logic)."""

from __future__ import annotations

import itertools
import time

from streams.config import Settings
from streams.outgoing import now_ms
from streams.pressure import (
    FORWARD_TRANSIT_MS,
    FULL,
    MAX_RETRY_AFTER_MS,
    OK,
    TRANSIT_MS,
    WARN,
    PressureBoard,
    PressureGauge,
    StageCap,
    retry_after_ms,
    stage_caps,
)


def gauge(cap: int = 100) -> PressureGauge:
    return PressureGauge("workers", StageCap(cap, 4.0, 64), warn_ratio=0.8)


def test_states_have_hysteresis() -> None:
    g = gauge()
    seq = [(0, OK), (79, OK), (80, WARN), (100, FULL), (95, FULL), (89, WARN), (75, WARN), (71, OK), (80, WARN)]
    for lag, expected in seq:
        assert g.update(lag, 0)["state"] == expected, lag


def test_drain_rate_and_seconds_cap() -> None:
    g = PressureGauge("workers", StageCap(None, 2.0, 10), warn_ratio=0.8, window_s=5.0)
    t = 1000.0
    for i in range(11):  # 50 messages/s committed over 5 s with a backlog
        state = g.update(500, i * 25, at=t + i * 0.5)
    assert abs(state["drain_rate"] - 50) < 1e-6
    assert state["cap"] == 100  # 2 s of work at 50/s
    assert state["drain_time_ms"] == 10_000
    g.update(0, 275, at=t + 5.5)  # drained at the same rate
    for k in range(100):  # idle for 20 s: the busy rate is kept
        idle = g.update(0, 275, at=t + 5.7 + k * 0.2)
    assert idle["cap"] == 100 and idle["state"] == OK and abs(idle["drain_rate"] - 50) < 1e-6


def test_the_drain_rate_follows_a_slowdown_and_a_speedup_after_the_window() -> None:
    g = PressureGauge("workers", StageCap(None, 4.0, 64), warn_ratio=0.8, window_s=15.0, short_s=5.0)
    committed, t = 0, 1000.0

    def run(seconds: float, rate: int) -> dict:
        nonlocal committed, t
        for _ in range(round(seconds / 0.2)):
            committed, t = committed + rate // 5, t + 0.2
            state = g.update(1000, committed, at=t)
        return state

    run(20, 100)
    assert abs(g.drain_rate - 100) < 1e-6
    run(10, 50)  # a slow stretch: the rate drops to it once a spell has ended inside it
    assert abs(g.drain_rate - 50) < 1e-6
    state = run(10, 100)  # back at 100/s: the slow spell is still in the window
    assert abs(g.drain_rate - 50) < 1e-6 and state["cap"] == int(4 * g.drain_rate)
    state = run(10, 100)  # three 5 s spells at 100/s since: the slow one has left
    assert abs(g.drain_rate - 100) < 1e-6 and state["cap"] == int(4 * g.drain_rate)


def test_a_slow_start_does_not_swing_the_cap() -> None:
    """Spells counted back from each sample slid across a slow start and swung the cap
    up and down by 40% within a second, below lag it had just admitted."""
    g = PressureGauge("workers", StageCap(None, 4.0, 64), warn_ratio=0.8, window_s=15.0, short_s=5.0)
    committed, caps = 0, []
    for i in range(150):  # 30 s sampled every 0.2 s: 3 s at 50/s, then 100/s
        committed += 10 if i < 15 else 20
        caps.append(g.update(1000, committed, at=1000.0 + i * 0.2)["cap"])
    assert caps == sorted(caps)
    assert abs(caps[-1] - 400) <= 1  # 4 s at 100/s, once the slow start left the window


def test_seconds_cap_ramps_up_while_the_rate_window_fills() -> None:
    g = PressureGauge("workers", StageCap(None, 4.0, 64), warn_ratio=0.8, window_s=15.0)
    caps = []
    for i in range(1, 101):  # 100 messages/s with a backlog, sampled every 0.2 s for 20 s
        caps.append(g.update(1000, i * 20, at=1000.0 + i * 0.2)["cap"])
    assert caps[0] == 64  # the floor while no rate is known
    assert caps == sorted(caps)  # a steady rate: the cap only grows
    assert 190 <= caps[36] <= 210  # 7.4 s of the 15 s window: about half of 4 s x 100/s
    assert caps[-1] == 400  # window full: 4 s of work


def state(lag: int, cap: int, st: str, rate: float = 100.0) -> dict:
    return {
        "stage": "workers",
        "lag": lag,
        "cap": cap,
        "state": st,
        "drain_rate": rate,
        "drain_time_ms": 0,
        "updated_ms": now_ms(),
    }


def test_priorities_are_shed_in_order() -> None:
    board = PressureBoard(stale_s=3, warn_ratio=0.8)
    board.publish(state(85, 100, WARN))
    assert board.check(["workers"], "low") is not None
    assert board.check(["workers"], "normal") is None
    board.publish(state(101, 100, FULL))
    assert board.check(["workers"], "normal") is not None
    assert board.check(["workers"], "high") is None
    board.publish(state(125, 100, FULL))
    refusal = board.check(["workers"], "high")
    assert refusal is not None and refusal.stage == "workers" and refusal.cap == 100 and refusal.lag == 125


def test_admitted_requests_count_until_the_next_state() -> None:
    board = PressureBoard(stale_s=3, warn_ratio=0.8)
    board.publish(state(90, 100, WARN))
    admitted = 0
    while board.admit(["workers"], "normal") is None:
        admitted += 1
    assert admitted == 10  # up to the cap, not one update interval past it
    board.publish(state(50, 100, OK))  # a newer state resets the local count
    assert board.admit(["workers"], "normal") is None


def test_a_state_measured_past_the_transit_time_takes_over_the_count() -> None:
    for transit_ms in (TRANSIT_MS, FORWARD_TRANSIT_MS):
        board = PressureBoard(stale_s=3, warn_ratio=0.8, transit_ms=transit_ms)
        board.publish(state(80, 100, WARN))
        for _ in range(15):
            assert board.admit(["workers"], "normal") is None
        sent_ms = now_ms()
        # measured before the sends had time to reach the lag: they still count
        board.publish({**state(80, 100, WARN), "updated_ms": sent_ms + transit_ms // 2})
        assert board.check(["workers"], "normal") is None
        for _ in range(5):
            board.admit(["workers"], "normal")
        assert board.check(["workers"], "normal") is not None  # 80 + 20 sent
        # measured past the transit time: the state holds them, the board stops adding
        board.publish({**state(95, 100, WARN), "updated_ms": sent_ms + transit_ms + 20})
        assert board.check(["workers"], "normal") is None, transit_ms


def test_stale_pressure_is_full_for_low_and_warn_for_the_rest() -> None:
    board = PressureBoard(stale_s=0.05, warn_ratio=0.8)
    assert board.check(["workers"], "low") is not None  # never seen
    assert board.check(["workers"], "normal") is None
    board.publish(state(0, 100, OK))
    assert board.check(["workers"], "low") is None
    deadline = time.monotonic() + 2
    while board.check(["workers"], "low") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert board.check(["workers"], "low") is not None
    assert board.check(["workers"], "high") is None


def test_retry_after_follows_the_drain() -> None:
    assert retry_after_ms(300, 100, 100.0) == 2000
    assert retry_after_ms(101, 100, 1000.0) == 50  # floor
    assert retry_after_ms(10, 5, 0.0) == 1000  # unknown rate


def test_refused_callers_are_given_retry_times_one_drain_interval_apart() -> None:
    board = PressureBoard(stale_s=5, warn_ratio=0.8)
    board.publish({**state(120, 100, FULL), "drain_rate": 50.0})  # drains to 90 in 600 ms, 20 ms per request
    peeked = [board.check(["workers"], "normal") for _ in range(3)]
    assert [r.retry_after_ms for r in peeked if r] == [600, 600, 600]  # a check hands nothing out
    handed = [r.retry_after_ms for r in (board.admit(["workers"], "normal") for _ in range(5)) if r]
    assert len(handed) == 5 and all(18 <= b - a <= 20 for a, b in itertools.pairwise(handed)), handed
    assert 599 <= handed[0] <= 600
    # the processors' fair-share refusals take their place in the same line (120 -> 90 at 50/s: 600 ms)
    assert board.retry_after("workers", 120, 90, 50.0) <= 720
    for _ in range(3000):  # never past the most a caller is told to wait
        last = board.admit(["workers"], "normal")
    assert last is not None and last.retry_after_ms <= MAX_RETRY_AFTER_MS


def test_each_stage_cap_floor_is_four_of_its_own_batches() -> None:
    caps = stage_caps(Settings(max_batch=16, processor_batch=64))
    assert caps["workers"].resolve(0.0) == 64
    assert caps["processors"].resolve(0.0) == 256
    assert caps["processors"].resolve(1000.0) == 2000  # 2 s of work once the rate is known


def test_retry_hints_come_back_to_the_drain_time_once_a_storm_drained() -> None:
    board = PressureBoard(stale_s=5, warn_ratio=0.8)
    board.publish({**state(120, 100, FULL), "drain_rate": 50.0})  # 120 -> 90 at 50/s: 600 ms
    storm = [board.admit(["workers"], "normal") for _ in range(5000)]  # callers who never come back
    assert storm[-1] is not None and storm[-1].retry_after_ms == MAX_RETRY_AFTER_MS
    board.publish({**state(10, 100, OK), "drain_rate": 50.0})  # the backlog drained
    board.publish({**state(120, 100, FULL), "drain_rate": 50.0})  # and filled again
    refused = board.admit(["workers"], "normal")
    assert refused is not None and 599 <= refused.retry_after_ms <= 600, refused
    # within one spell of pressure the line holds: the next caller comes after it
    following = board.admit(["workers"], "normal")
    assert following is not None and 618 <= following.retry_after_ms <= 620


def test_the_line_of_retry_times_holds_while_the_stage_only_dips_below_full() -> None:
    board = PressureBoard(stale_s=5, warn_ratio=0.8)
    board.publish({**state(120, 100, FULL), "drain_rate": 50.0})
    handed = [board.admit(["workers"], "normal") for _ in range(50)]  # 50 callers, 20 ms apart
    assert handed[-1] is not None and handed[-1].retry_after_ms >= 599 + 49 * 19
    board.publish({**state(85, 100, WARN), "drain_rate": 50.0})  # a dip: the 50 are still coming back
    board.publish({**state(120, 100, FULL), "drain_rate": 50.0})
    after = board.admit(["workers"], "normal")
    assert after is not None and after.retry_after_ms > handed[-1].retry_after_ms - 50  # behind them, not among them
