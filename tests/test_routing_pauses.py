"""A pool its provider paused (streams/pauses.py) is full to the routers
(streams/routing.py) until the pause ends: new requests go to another pool of the
model, or are refused with a retry time that includes the provider's wait; `high`
passes as at a full pool; a later, shorter pause never cuts a longer one short; and
the monitor's breaker (ops/pools.py) does not take the pause for a stall."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ops.burrow import STOP
from ops.pools import PoolStates
from schemas import get_codec
from streams.config import Settings
from streams.fleet import Fleet, load_fleet, parse_fleet
from streams.lag import PartitionLag, StageLag
from streams.outgoing import now_ms
from streams.pauses import PAUSE_KEY_PREFIX, PoolPauses, pause_message
from streams.pressure import FULL, PressureBoard
from streams.routing import FULL_REASON, PAUSED, NoRoute, Route, Router
from tests.test_routing import board, state

FLEET = {
    "models": {"smol": {"token_budget": 512}, "tiny": {"token_budget": 256}, "big": {}},
    "pools": {
        "local": {"engine": "echo", "models": ["smol"]},
        "hosted": {
            "engine": "openai",
            "base_url": "http://127.0.0.1:1/v1",
            "provider_model": "m",
            "models": ["smol", "big"],
        },
        "spare": {"engine": "echo", "models": ["tiny"]},
    },
}


def fleet() -> Fleet:
    return parse_fleet(FLEET, Settings(topic_prefix="t."))


def pause(b: PressureBoard, pool: str, for_ms: int, **extra: Any) -> None:
    b.pauses.note({"pool": pool, "until_ms": now_ms() + for_ms, "reason": "429", "member": "w:1", **extra})


def test_a_paused_pool_is_passed_over_for_another_pool_of_its_model() -> None:
    # the hosted pool is idle and would win on expected wait, but its provider asked to wait
    b = board(state("workers.local", 50, cap=1000, rate=10), state("workers.hosted", 0, cap=1000, rate=100))
    router = Router(fleet(), b)
    assert isinstance(r := router.route("smol", count=False), Route) and r.pool.name == "hosted"
    pause(b, "hosted", 5000)
    route = router.route("smol", request_id="r1")
    assert isinstance(route, Route) and route.pool.name == "local" and route.fallback_from is None


def test_with_no_other_room_the_refusal_waits_out_the_provider() -> None:
    b = board(
        state("workers.local", 2000, FULL, cap=1000, rate=100),  # drains below its line in ~11 s
        state("workers.hosted", 10, cap=1000, rate=100),
    )
    router = Router(fleet(), b)
    pause(b, "hosted", 5000)
    refused = router.route("smol", request_id="r1")
    assert isinstance(refused, NoRoute) and refused.reason == PAUSED and refused.stage == "workers.hosted"
    assert 4500 <= refused.retry_after_ms <= 5000, refused  # the earliest: the provider's wait
    assert "paused: its provider asked to wait" in refused.why and "pools that could serve" in refused.why
    # the other pool frees first: its time wins
    pause(b, "hosted", 40_000)
    sooner = router.route("smol", request_id="r2")
    assert isinstance(sooner, NoRoute) and sooner.reason == FULL_REASON and sooner.stage == "workers.local"


def test_a_pause_longer_than_the_drain_hints_cap_is_told_in_full_and_a_full_backlog_adds_its_drain() -> None:
    b = board(state("workers.hosted", 10, cap=1000, rate=100))
    router = Router(fleet(), b)
    pause(b, "hosted", 107_000)  # LiteLLM slept 9 s where 107 s was asked
    refused = router.route("big", request_id="r1")  # only the hosted pool serves it
    assert isinstance(refused, NoRoute) and 106_000 <= refused.retry_after_ms <= 107_000
    b.publish(state("workers.hosted", 1500, FULL, cap=1000, rate=100))  # and past its cap: ~6 s to drain
    behind = router.route("big", request_id="r2")
    assert isinstance(behind, NoRoute) and 112_000 <= behind.retry_after_ms <= 114_000, behind


def test_high_priority_passes_a_paused_pool_as_it_passes_a_full_one_and_the_pause_ends() -> None:
    b = board(state("workers.local", 2000, FULL, cap=1000, rate=100), state("workers.hosted", 10, cap=1000))
    router = Router(fleet(), b)
    pause(b, "hosted", 5000)
    assert isinstance(router.route("smol", priority="low", request_id="l"), NoRoute)
    high = router.route("smol", priority="high", request_id="h")
    assert isinstance(high, Route) and high.pool.name == "hosted"  # it waits in the pool for the pause
    b.pauses.note({"pool": "hosted", "until_ms": now_ms() - 1, "member": "w:2"})  # older news: ignored
    assert b.pauses.remaining_ms("hosted") > 4000
    later = PoolPauses()
    later.note({"pool": "hosted", "until_ms": now_ms() - 1})
    assert later.remaining_ms("hosted") == 0 and later.current("hosted") is None


def test_a_second_shorter_pause_keeps_the_first_longer_one() -> None:
    pauses = PoolPauses()
    at = now_ms()
    pauses.note({"pool": "hosted", "until_ms": at + 60_000, "member": "w:1"})
    kept = pauses.note({"pool": "hosted", "until_ms": at + 1_000, "member": "w:2"})
    assert kept.until_ms == at + 60_000 and kept.member == "w:1"
    longer = pauses.note({"pool": "hosted", "until_ms": at + 90_000, "member": "w:2"})
    assert longer.member == "w:2" and pauses.remaining_ms("hosted", at) == 90_000


def test_the_pause_record_is_keyed_by_pool_on_the_pressure_topic() -> None:
    out = pause_message("t.pressure", "hosted", 123, "429 retry-after-ms: 1500", "host:1")
    assert out.topic == "t.pressure" and out.key == f"{PAUSE_KEY_PREFIX}hosted".encode()
    name, record = get_codec().decode(out.value)
    assert name == "PoolPause" and record["until_ms"] == 123 and record["member"] == "host:1"


def test_a_paused_pool_is_not_stalled_for_the_breaker_while_it_waits_and_a_health_window_after(
    tmp_path: Path,
) -> None:
    """Paused, a remote pool commits nothing (Burrow: STOP on its partitions with lag);
    that is its provider's wait, not a hang: the circuit stays closed, and a pool that is
    not paused and stalls still opens."""
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(FLEET))
    settings = Settings(fleet_file=str(path), health_window_s=30.0)
    fleet = load_fleet(settings)
    pauses = PoolPauses()
    pools = PoolStates(settings, fleet, pauses)
    try:
        partitions = {"0": PartitionLag("t", 0, 9, 0, 9, 0.0, 0.0), "1": PartitionLag("t", 1, 4, 0, 4, 0.0, 0.0)}
        lag = StageLag("workers.hosted", 13, 13, 0, partitions)
        pauses.note({"pool": "hosted", "until_ms": now_ms() + 60_000, "member": "w:1"})
        state: dict[str, Any] = {"stage": "workers.hosted", "members": 2}
        pools.judge("workers.hosted", lag, {"0": STOP, "1": STOP}, state)
        assert state["circuit"] == "closed"
        # after the pause, for a health window: Burrow's window still holds the paused commits
        for ended_s_ago, lately in ((10, True), (40, False)):
            pools.pauses = PoolPauses()
            pools.pauses.note({"pool": "hosted", "until_ms": now_ms() - ended_s_ago * 1000})
            assert pools._paused_lately(fleet.pools["hosted"]) is lately
        local = {"stage": "workers.local", "members": 1}
        pools.judge("workers.local", StageLag("workers.local", 13, 13, 0, partitions), {"0": STOP, "1": STOP}, local)
        assert local["circuit"] == "open" and local["circuit_reason"] == "stalled"
    finally:
        pools.close()
