"""Routing by pressure (streams/routing.py), pure logic over a hand-fed PressureBoard:
the least expected wait wins, a full or open-circuited model falls back and says why,
a refusal carries the earliest retry of every pool that could serve, half-open probes
are bounded, round robin rotates, and the default one-pool fleet is today's check."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from streams import pressure as pressure_module
from streams.config import Settings
from streams.fleet import Fleet, default_fleet, parse_fleet
from streams.outgoing import now_ms
from streams.pressure import DEFAULT_RETRY_AFTER_MS, FULL, OK, WARN, PressureBoard
from streams.routing import CIRCUIT_OPEN, FULL_REASON, ROUND_ROBIN, NoRoute, Route, Router, UnknownModel, first_route

FLEET = {
    "models": {
        "smol": {"aliases": ["gpt-4o-mini"], "token_budget": 512, "fallbacks": ["tiny"]},
        "tiny": {"token_budget": 256},
    },
    "pools": {
        "fast": {"engine": "sim:5", "models": ["smol"], "weight": 2},
        "slow": {"engine": "sim:20", "models": ["smol"]},
        "spare": {"engine": "echo", "models": ["tiny"]},
    },
}
_clock = itertools.count(now_ms())


def fleet() -> Fleet:
    return parse_fleet(FLEET, Settings(topic_prefix="t."))


def state(stage: str, lag: int, level: str = OK, cap: int = 100, rate: float = 100.0, **extra: Any) -> dict[str, Any]:
    """A pool's PressureState as the monitor publishes it; each newer than the last."""
    return {
        "stage": stage,
        "lag": lag,
        "cap": cap,
        "state": level,
        "drain_rate": rate,
        "drain_time_ms": 0,
        "updated_ms": next(_clock),
        **extra,
    }


def board(*states: dict[str, Any]) -> PressureBoard:
    b = PressureBoard(stale_s=30, warn_ratio=0.8)
    for s in states:
        b.publish(s)
    return b


def routed(outcome: Route | NoRoute) -> Route:
    assert isinstance(outcome, Route), outcome
    return outcome


def test_the_least_expected_wait_wins() -> None:
    # fast: 40 queued at 100/s (0.41 s); slow: 10 queued at 10/s (1.1 s)
    b = board(state("workers.fast", 40, cap=1000, rate=100), state("workers.slow", 10, cap=1000, rate=10))
    router = Router(fleet(), b)
    route = routed(router.route("smol", priority="normal", request_id="r1"))
    assert (route.pool.name, route.model.id, route.fallback_from, route.fallback_reason) == ("fast", "smol", None, None)
    assert b.admitted("workers.fast") == 1  # counted on the pool it was routed to
    # its own admissions lengthen a pool's wait: fast's 40 + 70 counted at 100/s pass 1.1 s
    pools = [routed(router.route("smol", request_id=f"b{i}")).pool.name for i in range(80)]
    assert pools[:69] == ["fast"] * 69 and pools[69] == "slow"
    # an alias routes as its model
    assert routed(router.route("gpt-4o-mini", count=False)).model.id == "smol"


def test_idle_pools_without_a_measured_rate_go_heaviest_first_and_share_a_burst() -> None:
    b = board(state("workers.fast", 0, rate=0), state("workers.slow", 0, rate=0))
    router = Router(fleet(), b)
    pools = [routed(router.route("smol", request_id=f"r{i}")).pool.name for i in range(6)]
    assert pools[0] == "fast"  # weight 2 stands in for the rate: 1/2 s against 1 s
    assert pools.count("fast") == 4 and pools.count("slow") == 2  # in proportion to the weights


def test_a_pool_whose_group_has_no_member_is_the_last_choice() -> None:
    """A pool no worker consumes (its group empty: `replicas: 0`, its workers not
    deployed or all gone) drains nothing: its wait is not its weight's. Ranked by the
    weight, an idle empty pool beat a busy pool with workers, and its requests waited
    for workers that might never come (its circuit opens only once work has waited
    there 2 s). It still takes a request no other pool of the model has room for."""
    b = board(
        state("workers.fast", 500, cap=1000, rate=10, members=2),  # 50 s of backlog, drained
        state("workers.slow", 0, cap=1000, rate=0, members=0),  # idle, nobody there
    )
    router = Router(fleet(), b)
    assert [routed(router.route("smol", request_id=f"r{i}")).pool.name for i in range(3)] == ["fast"] * 3
    b.publish(state("workers.fast", 1000, FULL, cap=1000, rate=10, members=2))
    assert routed(router.route("smol", request_id="s")).pool.name == "slow"
    # a member count unknown (-1: Tansu lists none) is no empty group
    b.publish(state("workers.fast", 500, cap=1000, rate=10, members=2))
    b.publish(state("workers.slow", 0, cap=1000, rate=0, members=-1))
    assert routed(router.route("smol", request_id="t")).pool.name == "slow"


def test_a_full_primary_falls_back_with_reason_full() -> None:
    b = board(state("workers.fast", 120, FULL), state("workers.slow", 130, FULL), state("workers.spare", 3, rate=50))
    route = routed(Router(fleet(), b).route("smol", priority="normal", request_id="r"))
    assert (route.pool.name, route.model.id) == ("spare", "tiny")
    assert (route.fallback_from, route.fallback_reason) == ("smol", FULL_REASON)
    assert route.model.token_budget == 256  # compressed to the budget of the model that serves it
    # a request's own fallbacks replace the model's chain: none given that can serve
    assert isinstance(Router(fleet(), b).route("smol", ["smol"], request_id="s"), NoRoute)


def test_an_open_circuit_is_skipped_with_reason_circuit_open() -> None:
    until = now_ms() + 20_000
    b = board(
        state("workers.fast", 0, circuit="open", circuit_until_ms=until, circuit_reason="errors"),
        state("workers.slow", 0, circuit="open", circuit_until_ms=until),
        state("workers.spare", 0),
    )
    route = routed(Router(fleet(), b).route("smol", request_id="r"))
    assert (route.pool.name, route.fallback_from, route.fallback_reason) == ("spare", "smol", CIRCUIT_OPEN)
    # one of the pools open, the other merely full: the model was passed over as full
    b.publish(state("workers.slow", 200, FULL))
    assert routed(Router(fleet(), b).route("smol", request_id="s")).fallback_reason == FULL_REASON
    # one pool of the primary open, the other with room: no fallback at all
    b.publish(state("workers.slow", 5))
    route = routed(Router(fleet(), b).route("smol", request_id="t"))
    assert (route.pool.name, route.fallback_from) == ("slow", None)


def test_when_every_candidate_is_full_the_refusal_has_the_earliest_retry() -> None:
    until = now_ms() + 2_500
    b = board(
        state("workers.fast", 300, FULL, rate=10),  # 30 s of backlog above its line
        state("workers.slow", 0, circuit="open", circuit_until_ms=until),  # half-opens in 2.5 s
        state("workers.spare", 110, FULL, rate=100),  # below its exit line (90) in 200 ms
    )
    router = Router(fleet(), b)
    refusal = router.route("smol", priority="normal", request_id="r")
    assert isinstance(refusal, NoRoute)
    assert (refusal.stage, refusal.reason, refusal.pools) == ("workers.spare", FULL_REASON, 3)
    assert 150 <= refusal.retry_after_ms <= 250
    assert "workers.spare lag 110 is past its cap 100" in refusal.why
    # the next refusal is handed the next place in spare's line, one drain interval on
    assert router.route("smol", request_id="r2").retry_after_ms > refusal.retry_after_ms  # type: ignore[union-attr]
    # the open circuit is soonest once spare's backlog is long
    b.publish(state("workers.spare", 2000, FULL, rate=100))
    refusal = router.route("smol", request_id="r3")
    assert isinstance(refusal, NoRoute) and refusal.reason == CIRCUIT_OPEN and refusal.stage == "workers.slow"
    assert 2_000 <= refusal.retry_after_ms <= 2_500
    assert b.admitted("workers.fast") == b.admitted("workers.spare") == 0  # nothing counted


def test_half_open_admits_at_most_its_probes_per_published_state() -> None:
    fleet_one = parse_fleet(
        {"models": {"smol": {}}, "pools": {"fast": {"engine": "echo", "models": ["smol"]}}}, Settings()
    )
    b = board(state("workers.fast", 0, circuit="half_open", probes=2))
    router = Router(fleet_one, b)
    assert isinstance(router.route("smol", count=False), Route)  # asking spends no probe
    outcomes = [router.route("smol", request_id=f"p{i}") for i in range(4)]
    assert [isinstance(o, Route) for o in outcomes] == [True, True, False, False]
    assert outcomes[2].reason == CIRCUIT_OPEN and outcomes[2].retry_after_ms == DEFAULT_RETRY_AFTER_MS  # type: ignore[union-attr]
    router.release("p0")  # a probe taken back (its quota refused it) is free again
    assert isinstance(router.route("smol", request_id="p4"), Route)
    b.publish(state("workers.fast", 0, circuit="half_open", probes=2))  # the next state: a new allowance
    assert [isinstance(router.route("smol", request_id=f"q{i}"), Route) for i in range(3)] == [True, True, False]
    # an open circuit past its cool-down, the monitor's half-open state not here yet: one probe
    b.publish(state("workers.fast", 0, circuit="open", circuit_until_ms=now_ms() - 1))
    assert [isinstance(router.route("smol", request_id=f"o{i}"), Route) for i in range(2)] == [True, False]


def test_a_stale_state_holds_no_circuit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor gone (its states stale past PRESSURE_STALE_S), the circuits it left
    are not held: a stale state says nothing of now, so backpressure's rule for it
    applies (normal and high pass). Held, an open circuit past its cool-down let one
    probe through per router and then refused the model until the monitor came back:
    its half-open allowance is per published state, and none was published."""
    b = board(
        state("workers.spare", 0, circuit="open", circuit_until_ms=now_ms() - 1, circuit_reason="errors"),
        state("workers.fast", 0, circuit="open", circuit_until_ms=now_ms() + 60_000),
        state("workers.slow", 0, circuit="open", circuit_until_ms=now_ms() + 60_000),
    )
    router = Router(fleet(), b)
    # fresh: smol's pools open, its fallback's past its cool-down takes one probe
    assert routed(router.route("smol", request_id="f1")).fallback_reason == CIRCUIT_OPEN
    assert isinstance(router.route("tiny", request_id="f2"), NoRoute)
    later = pressure_module.time.monotonic() + 60  # the states are a minute old: stale
    monkeypatch.setattr(pressure_module.time, "monotonic", lambda: later)
    assert [routed(router.route("tiny", request_id=f"t{i}")).pool.name for i in range(3)] == ["spare"] * 3
    route = routed(router.route("smol", request_id="s"))
    assert (route.model.id, route.fallback_from) == ("smol", None)
    assert router.near_full("tiny") is None


def test_round_robin_rotates_among_the_admitting_pools() -> None:
    b = board(state("workers.fast", 0), state("workers.slow", 90, WARN))  # slow's wait is far longer
    router = Router(fleet(), b, mode=ROUND_ROBIN)
    pools = [routed(router.route("smol", request_id=f"r{i}")).pool.name for i in range(6)]
    assert pools == ["fast", "slow"] * 3
    b.publish(state("workers.slow", 200, FULL))  # a full pool drops out of the rotation
    assert {routed(router.route("smol", request_id=f"s{i}")).pool.name for i in range(4)} == {"fast"}


def test_a_pool_with_no_state_passes_normal_and_high_and_refuses_low() -> None:
    router = Router(fleet(), board())
    assert routed(router.route("smol", priority="high", request_id="h")).pool.name == "fast"
    refusal = router.route("tiny", priority="low", request_id="l")
    assert isinstance(refusal, NoRoute) and refusal.retry_after_ms == DEFAULT_RETRY_AFTER_MS


def test_an_unknown_model_is_refused_by_name() -> None:
    with pytest.raises(UnknownModel, match="unknown model 'gpt-5'"):
        Router(fleet(), board()).route("gpt-5")
    with pytest.raises(UnknownModel):
        first_route(fleet(), "x" * 10_000)
    assert first_route(fleet(), "").pool.name == "fast"  # the default model's heaviest pool


def test_near_full_only_when_every_candidate_pool_is_past_its_warn_line() -> None:
    b = board(state("workers.fast", 85, WARN), state("workers.slow", 95, WARN), state("workers.spare", 10))
    router = Router(fleet(), b)
    assert router.near_full("smol") is None  # its fallback tiny has room
    assert router.near_full("smol", ["smol"]) is not None
    stage, retry = router.near_full("smol", ["smol"])  # type: ignore[misc]
    assert stage == "workers.fast" and retry > 0  # 85 -> 72 drains before 95 -> 72


def test_the_default_fleet_routes_exactly_as_the_single_workers_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same states and requests through today's `board.admit(["workers"], ...)` and
    through the router over the default fleet: the same admissions, refusals and
    retry times, on a clock both share."""
    clock = [1_000_000]
    monkeypatch.setattr(pressure_module, "now_ms", lambda: clock[0])
    monkeypatch.setattr("streams.routing.now_ms", lambda: clock[0])
    settings = Settings(model="echo")
    today, routed_board = board(), board()
    router = Router(default_fleet(settings), routed_board)
    steps = [
        (None, ["low", "normal", "high"]),  # no state yet
        (state("workers", 70, OK, rate=50), ["low"] * 15 + ["normal"] * 20 + ["high"] * 20),
        (state("workers", 120, FULL, rate=50), ["low", "normal", "normal", "high", "high"] * 4),
        (state("workers", 10, OK, rate=50), ["normal"] * 5),
        (state("workers", 90, WARN, rate=0), ["low", "normal", "high"] * 3),
    ]
    n = 0
    for published, priorities in steps:
        if published is not None:
            published["updated_ms"] = clock[0]
            today.publish(published)
            routed_board.publish(dict(published))
        for priority in priorities:
            n += 1
            clock[0] += 3
            expected = today.admit(["workers"], priority, f"r{n}")
            got = router.route("", (), priority, f"r{n}")
            if expected is None:
                assert isinstance(got, Route) and got.pool.stage == "workers" and got.fallback_from is None
            else:
                assert isinstance(got, NoRoute), (n, priority)
                assert (got.stage, got.lag, got.cap, got.retry_after_ms) == (
                    expected.stage,
                    expected.lag,
                    expected.cap,
                    expected.retry_after_ms,
                ), (n, priority)
                assert got.why == f"stage workers lag {expected.lag} is past its cap {expected.cap}"
            assert today.admitted("workers") == routed_board.admitted("workers")
