"""`tidegate bench fleet`'s pure parts (bench/fleet_summary.py): the fleet files it
writes are fleets streams/fleet.py accepts, and its figures (rates as the slope of a
batch staircase, goodput against the pools' combined capacity, lost requests, the
fallback's share, the circuit's times) come out as defined. No broker: the bench
itself runs on one (`tidegate bench fleet`)."""

from __future__ import annotations

import pytest
import yaml

from bench.fleet import overflow_fleet, routing_fleet
from bench.fleet_summary import (
    LOST,
    REJECTED,
    Outcome,
    circuit_changes,
    first_seen,
    kill_summary,
    nominal_rps,
    overflow_summary,
    routing_summary,
    slope_rate,
)
from streams.config import Settings
from streams.fleet import parse_fleet


def batches(rate_rows: int, period_s: float, start: float, end: float, jitter_s: float = 0.002) -> list[float]:
    """Done times of `rate_rows` replies every `period_s`, each batch's a few ms apart."""
    times, t = [], start
    while t <= end:
        times += [t + i * jitter_s / rate_rows for i in range(rate_rows)]
        t += period_s
    return times


def test_the_fleet_files_the_bench_writes_parse_as_fleets() -> None:
    settings = Settings()
    fleet = parse_fleet(yaml.safe_load(overflow_fleet()), settings)
    assert [m.id for m in fleet.candidates("large")] == ["large", "small"]  # the fallback path
    assert fleet.candidates("large", ["large"])[0].id == "large" and len(fleet.candidates("large", ["large"])) == 1
    assert {p.name: (p.engine, p.max_batch, p.replicas) for p in fleet.pools.values()} == {
        "primary": ("sim:20", 8, 1),
        "fallback": ("sim:20", 8, 1),
    }
    # the kill case starts the primary's worker itself: the supervisor would restart it
    assert parse_fleet(yaml.safe_load(overflow_fleet(replicas=0)), settings).pools["primary"].replicas == 0
    routing = parse_fleet(yaml.safe_load(routing_fleet()), settings)
    assert [p.name for p in routing.pools_of("chat")] == ["fast", "slow"]
    assert {p.weight for p in routing.pools.values()} == {1.0}  # speeds learnt from drain rates


def test_a_batch_staircase_has_its_rate_wherever_the_window_falls() -> None:
    times = batches(8, 0.32, 0.0, 60.0)  # 25 replies/s
    assert nominal_rps(20, 8, 16) == 25.0
    starts = [3.0 + k * 0.02 for k in range(16)]  # over one batch period
    for start in starts:
        assert slope_rate(times, start, start + 14.0) == pytest.approx(25.0, rel=0.01)
    # a count over the same windows moves by a batch (8 / 14 s) as the edges move
    counts = {sum(start <= t <= start + 14.0 for t in times) / 14.0 for start in starts}
    assert max(counts) - min(counts) == pytest.approx(8 / 14)
    assert slope_rate([1.0], 0.0, 2.0) == 0.0 and slope_rate([], 0.0, 2.0) == 0.0


def test_overflow_goodput_is_set_against_the_combined_capacity_and_counts_the_lost() -> None:
    primary = [Outcome(t - 4.0, t, "ok", "large") for t in batches(8, 0.32, 0.0, 30.0)]
    spare = [Outcome(t - 4.0, t, "ok", "small", "large", "full") for t in batches(8, 0.32, 0.1, 30.0)]
    late = [Outcome(0.0, 12.0, "ok", "large")]  # past its 10 s deadline: not goodput
    refused = [Outcome(1.0, 1.0, REJECTED)] * 50
    outcomes = primary + spare + late + refused + [Outcome(2.0, 42.0, LOST)]
    s = overflow_summary(outcomes, len(outcomes) + 2, (5.0, 30.0), {"primary": 25.0, "fallback": 26.0}, 10.0)
    assert s["goodput_rps"] == pytest.approx(50.0, rel=0.01)
    assert s["combined_capacity_rps"] == 51.0
    assert s["goodput_over_combined"] == pytest.approx(50 / 51, abs=0.01)
    assert s["fallback_share"] == pytest.approx(0.5, abs=0.01)
    assert s["fallback_reasons"] == {"full": len(spare)}
    assert s["lost"] == 3  # one timed out, two never recorded
    assert s["statuses"][REJECTED] == 50 and not s["target_met"]
    assert overflow_summary(primary + spare, len(primary + spare), (5.0, 30.0), {"a": 25, "b": 26}, 10)["target_met"]


def test_the_kill_case_times_the_circuit_from_the_kill_and_from_the_return() -> None:
    timeline = [{"stage": "workers.primary", "circuit": "closed", "seen_at": t} for t in (9.0, 10.0, 15.0)]
    timeline += [{"stage": "workers", "circuit": "open", "seen_at": 16.0}]  # another stage: not this pool's
    timeline += [{"stage": "workers.primary", "circuit": "open", "circuit_reason": "no_members", "seen_at": 18.5}]
    timeline += [{"stage": "workers.primary", "circuit": "half_open", "seen_at": 34.0}]
    timeline += [{"stage": "workers.primary", "circuit": "closed", "seen_at": t} for t in (35.5, 36.0)]
    changes = circuit_changes(timeline, "workers.primary")
    assert [c[1] for c in changes] == ["closed", "open", "half_open", "closed"]
    assert first_seen(changes, "closed", 30.0) == 35.5 and first_seen(changes, "open", 40.0) is None
    before = [Outcome(t, t + 0.5, "ok", "large") for t in range(0, 10)]
    queued = [Outcome(t, 36.0, "ok", "large") for t in (10.5, 11.0)]  # waited for the primary
    fallback = [Outcome(t / 10, t / 10 + 0.5, "ok", "small", "large", "circuit_open") for t in range(190, 300)]
    marks = {"started": 0.0, "killed": 10.0, "returned": 30.5, "ready": 33.0}
    s = kill_summary(before + queued + fallback, 122, changes, marks, "large")
    assert (s["open_after_kill_s"], s["open_reason"]) == (8.5, "no_members")
    assert (s["close_after_return_s"], s["close_after_ready_s"]) == (5.0, 2.5)
    assert s["queued_in_primary"] == 2 and s["queued_statuses"] == {"ok": 2}
    assert s["queued_max_wait_s"] == 25.5
    assert s["fallback_rps_while_open"] == pytest.approx(10.0, rel=0.02)
    assert s["lost"] == 0 and s["target_met"]
    assert s["offered_rps"] == 1.0  # 10 requests in the 10 s before the kill


def test_routing_splits_latency_by_the_requests_sent_in_the_window_and_names_the_slow_share() -> None:
    fast = [Outcome(t, t + 0.2, "ok", "chat", inference_ms=160) for t in batches(4, 0.1, 0.0, 20.0)]
    slow = [Outcome(t, t + 4.0, "ok", "chat", inference_ms=640) for t in batches(1, 0.1, 0.0, 20.0)]
    s = routing_summary(fast + slow, len(fast + slow), (5.0, 15.0), 10.0, 320.0)
    assert s["slow_pool_share"] == pytest.approx(0.2, abs=0.01)
    assert s["p50_ms"] == pytest.approx(200.0, abs=1) and s["p99_ms"] == pytest.approx(4000.0, abs=1)
    assert s["goodput_rps"] == pytest.approx(50.0, rel=0.02) and s["lost"] == 0
