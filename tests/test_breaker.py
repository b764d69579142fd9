"""The pools' circuit breaker (ops/breaker.py) as a state machine, on a fake clock."""

from __future__ import annotations

import pytest

from ops.breaker import (
    CLOSED,
    ERRORS,
    HALF_OPEN,
    NO_MEMBERS,
    OPEN,
    REASONS,
    STALLED,
    Breaker,
    BreakerConfig,
    Circuit,
    Signals,
    stalled,
)
from ops.burrow import OK, STALL, STOP, WARN
from streams import metrics
from streams.config import Settings

CONFIG = BreakerConfig(window_s=30, min_replies=20, error_ratio=0.5, open_s=10, open_max_s=40, probes=3)
HEALTHY = Signals(lag=5, members=2, stalled=False)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, opened: list[str] | None = None) -> Breaker:
    return Breaker(CONFIG, clock, on_open=None if opened is None else opened.append)


def empty_for_long(b: Breaker, clock: Clock, lag: int = 1) -> Circuit:
    """The group empty with work waiting, at two samples EMPTY_S apart."""
    b.update(Signals(lag=lag, members=0, stalled=False))
    clock.now += CONFIG.empty_s
    return b.update(Signals(lag=lag, members=0, stalled=False))


def test_it_opens_at_half_errors_over_the_window_and_not_before_enough_replies(clock: Clock) -> None:
    b = breaker(clock)
    b.record(ok=5, errors=10)  # 2/3 errors, but 15 replies: too few to judge
    assert b.update(HEALTHY).state == CLOSED
    clock.now += 1
    b.record(ok=5, errors=0)  # 20 replies, 50% errors
    circuit = b.update(HEALTHY)
    assert (circuit.state, circuit.reason, circuit.until_ms) == (OPEN, ERRORS, int((clock.now + 10) * 1000))
    assert circuit.fields() == {
        "circuit": OPEN,
        "circuit_until_ms": int((clock.now + 10) * 1000),
        "probes": 0,
        "circuit_reason": ERRORS,
    }


def test_errors_slide_out_of_the_window(clock: Clock) -> None:
    b = breaker(clock)
    b.record(ok=0, errors=15)
    clock.now += 31  # those errors are older than the window now
    b.record(ok=10, errors=5)
    assert b.update(HEALTHY).state == CLOSED
    assert b.error_ratio() == (5 / 15, 15)


def test_expired_replies_are_no_failure(clock: Clock) -> None:
    b = breaker(clock)
    b.record(ok=5, errors=0, expired=500)  # a backlog past its deadlines: full, not broken
    assert b.update(HEALTHY).state == CLOSED


def test_no_members_with_work_waiting_opens_it_and_no_work_does_not(clock: Clock) -> None:
    b = breaker(clock)
    assert b.update(Signals(lag=0, members=0, stalled=False)).state == CLOSED  # scaled to zero, idle
    assert b.update(Signals(lag=0, members=-1, stalled=False)).state == CLOSED  # unknown (Tansu)
    # seen empty once: a member count asked every few seconds may predate the first join
    assert b.update(Signals(lag=3, members=0, stalled=False)).state == CLOSED
    clock.now += 1
    assert b.update(Signals(lag=3, members=1, stalled=False)).state == CLOSED  # it had joined
    assert b.update(Signals(lag=3, members=0, stalled=False)).state == CLOSED
    clock.now += 1.9
    assert b.update(Signals(lag=3, members=0, stalled=False)).state == CLOSED
    clock.now += 0.1
    circuit = b.update(Signals(lag=3, members=0, stalled=False))
    assert (circuit.state, circuit.reason) == (OPEN, NO_MEMBERS)


def test_a_stalled_pool_opens_it(clock: Clock) -> None:
    b = breaker(clock)
    circuit = b.update(Signals(lag=3, members=1, stalled=True))
    assert (circuit.state, circuit.reason) == (OPEN, STALLED)


def test_stalled_means_half_the_partitions_with_lag_make_no_progress() -> None:
    assert stalled({"0": STOP, "1": STALL}, {"0": 4, "1": 2})
    assert stalled({"0": STOP, "1": OK}, {"0": 4, "1": 2})  # one of two
    assert not stalled({"0": STALL, "1": OK, "2": WARN}, {"0": 4, "1": 2, "2": 1})  # one long generation
    assert not stalled({"0": STOP, "1": OK}, {"0": 0, "1": 2})  # STOP without lag: nothing waits
    assert not stalled({}, {})


def test_it_half_opens_after_the_cool_down_and_closes_on_its_probes(clock: Clock) -> None:
    b = breaker(clock)
    empty_for_long(b, clock, lag=3)
    clock.now += 9.9
    b.record(ok=100, errors=0)  # answered while open (its queued work): judged no more
    assert b.update(HEALTHY).state == OPEN
    clock.now += 0.1
    circuit = b.update(HEALTHY)
    assert (circuit.state, circuit.probes, circuit.reason) == (HALF_OPEN, 3, NO_MEMBERS)
    b.record(ok=2, errors=0)
    assert b.update(HEALTHY).state == HALF_OPEN
    b.record(ok=1, errors=0, expired=7)
    circuit = b.update(HEALTHY)
    assert (circuit.state, circuit.reason, circuit.probes) == (CLOSED, "", 0)


def test_a_failed_probe_opens_it_again_for_longer_up_to_the_bound(clock: Clock) -> None:
    opened: list[str] = []
    b = breaker(clock, opened)
    b.record(ok=0, errors=20)
    b.update(HEALTHY)
    cool_downs = []
    for _ in range(4):
        cool_downs.append(b.until - clock.now)
        clock.now = b.until
        assert b.update(HEALTHY).state == HALF_OPEN
        b.record(ok=2, errors=1)  # a probe failed
        assert b.update(HEALTHY).state == OPEN
    cool_downs.append(b.until - clock.now)
    assert cool_downs == [10, 20, 40, 40, 40]  # doubled, bounded by open_max_s
    assert opened == [ERRORS] * 5


def test_after_staying_closed_long_enough_the_next_opening_is_short_again(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(2):  # opened twice in a row: 10 s, then 20 s
        empty_for_long(b, clock)
        clock.now = b.until
        b.update(HEALTHY)
    assert b.cool_down_s() == 20 and b.state == HALF_OPEN
    b.record(ok=3, errors=0)
    assert b.update(HEALTHY).state == CLOSED
    clock.now += 5  # fails again soon after closing: longer
    empty_for_long(b, clock)
    assert b.until - clock.now == 40
    clock.now = b.until
    b.update(HEALTHY)
    b.record(ok=3, errors=0)
    b.update(HEALTHY)
    clock.now += 40  # closed for open_max_s: the run is forgotten
    b.update(HEALTHY)
    empty_for_long(b, clock)
    assert b.until - clock.now == 10


def test_a_cool_down_ending_with_the_group_still_empty_waits_for_a_member_without_counting_an_opening(
    clock: Clock,
) -> None:
    """Probes would queue behind the work nobody serves; and an empty group is seen
    ending, so it is waited out without doubling cool-downs: a pool down for minutes
    half-opens as soon as a worker is back."""
    opened: list[str] = []
    b = breaker(clock, opened)
    empty = Signals(lag=4, members=0, stalled=True)
    b.update(empty)  # stalled at once; empty not for long yet
    for _ in range(5):  # the workers stay away for 50 s and more
        clock.now = b.until
        circuit = b.update(empty)
        assert (circuit.state, circuit.reason, b.until - clock.now) == (OPEN, STALLED, 10)
    assert opened == [STALLED] and b.opens_in_row == 1
    clock.now += 3  # a member is back before the next hint: half-open at once
    circuit = b.update(Signals(lag=4, members=1, stalled=True))
    assert (circuit.state, circuit.probes) == (HALF_OPEN, 3)


def test_an_empty_group_in_its_cool_down_half_opens_only_once_the_cool_down_is_over(clock: Clock) -> None:
    b = breaker(clock)
    empty_for_long(b, clock)
    clock.now += 5
    assert b.update(HEALTHY).state == OPEN  # a member back within the cool-down: it runs out first
    clock.now = b.until
    assert b.update(HEALTHY).state == HALF_OPEN


def test_half_open_waits_on_a_stall_as_long_as_the_health_window(clock: Clock) -> None:
    """Burrow's STOP clears only at the pool's first commit after it came back: judged
    at once, it opened the circuit again before the returning workers committed."""
    b = breaker(clock)
    b.update(Signals(lag=4, members=1, stalled=True))
    clock.now = b.until
    still = Signals(lag=4, members=1, stalled=True)
    assert b.update(still).state == HALF_OPEN
    clock.now += 29
    assert b.update(still).state == HALF_OPEN
    clock.now += 1
    circuit = b.update(still)
    assert (circuit.state, circuit.reason) == (OPEN, STALLED)


def test_half_open_opens_again_when_the_group_empties(clock: Clock) -> None:
    b = breaker(clock)
    b.record(ok=0, errors=20)
    b.update(HEALTHY)
    clock.now = b.until
    assert b.update(Signals(lag=0, members=0, stalled=False)).state == HALF_OPEN  # nothing waits
    circuit = empty_for_long(b, clock)  # a probe, and nobody to take it
    assert (circuit.state, circuit.reason) == (OPEN, NO_MEMBERS)


def test_a_closed_circuits_window_starts_afresh() -> None:
    clock = Clock()
    b = breaker(clock)
    b.record(ok=0, errors=19)
    empty_for_long(b, clock)  # opened by no members, the errors cleared
    clock.now = b.until
    b.update(HEALTHY)
    b.record(ok=3, errors=0)
    assert b.update(HEALTHY).state == CLOSED
    b.record(ok=0, errors=1)  # 1 of 4 since closing
    assert b.update(HEALTHY).state == CLOSED


def test_the_defaults_come_from_settings_and_the_reasons_are_metric_labels() -> None:
    config = BreakerConfig.from_settings(Settings())
    assert (config.window_s, config.min_replies, config.error_ratio) == (30.0, 20, 0.5)
    assert (config.open_s, config.open_max_s, config.probes, config.half_open_stall_s) == (10.0, 120.0, 5, 30.0)
    assert all(metrics.bounded_label("reason", r) == r for r in REASONS)


def test_a_resumed_circuit_stays_open_until_its_time_and_then_half_opens(clock: Clock) -> None:
    """A restarted monitor takes the circuit up from its last published state."""
    b = breaker(clock)
    b.resume(OPEN, clock.now + 4, ERRORS)
    assert b.update(HEALTHY).state == OPEN
    clock.now += 4
    circuit = b.update(HEALTHY)
    assert (circuit.state, circuit.reason) == (HALF_OPEN, ERRORS)
    b.record(ok=0, errors=1)
    b.update(HEALTHY)
    assert b.until - clock.now == 20  # the resumed opening counts as one in a row
    b = breaker(clock)
    b.resume(CLOSED, 0, "")
    assert b.update(HEALTHY).state == CLOSED


def test_a_resumed_circuit_opens_no_longer_than_the_longest_cool_down(clock: Clock) -> None:
    """The state a restarted monitor resumes from is read off the pressure topic, its
    `circuit_until_ms` the wall clock of whichever host published it (or of whoever
    wrote the topic): one a day ahead kept the pool open for a day. At most the
    longest cool-down from now, it half-opens then."""
    b = breaker(clock)
    b.resume(OPEN, clock.now + 86_400, STALLED)
    assert b.update(HEALTHY).until_ms <= int((clock.now + CONFIG.open_max_s) * 1000)
    clock.now += CONFIG.open_max_s
    assert b.update(HEALTHY).state == HALF_OPEN


def test_half_open_does_not_close_while_the_pool_is_stalled(clock: Clock) -> None:
    """Probes answered ok while half the pool's partitions with work still make no
    progress (some of its workers hang): closed then, the next sample opened it again
    (counted as an opening in a row, its cool-down doubled), and for that sample every
    router sent it all it had. It closes once the stall clears, or opens again once the
    stall has lasted the health window."""
    b = breaker(clock)
    b.update(Signals(lag=4, members=2, stalled=True))
    clock.now = b.until
    still = Signals(lag=4, members=2, stalled=True)
    assert b.update(still).state == HALF_OPEN
    b.record(ok=CONFIG.probes, errors=0)
    clock.now += 1
    assert b.update(still).state == HALF_OPEN
    assert b.opens_in_row == 1
    circuit = b.update(Signals(lag=4, members=2, stalled=False))  # the stall cleared: its probes stand
    assert circuit.state == CLOSED
