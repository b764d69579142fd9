"""`tidegate scale advise`: members per stage from what the lag monitor publishes.

With a fleet (FLEET_FILE, streams/fleet.py) the workers are advised per pool: each
pool's state on the pressure topic (key `workers.<pool>`; `workers` for the `default`
pool) gives its lag, drain rate and members, and its advice is bounded by its own
partitions. Without the file here, the pools are learnt from their states on the topic
(streams/fleet.py fleet_from_states), as a client learns them; where none names a
pool, it is the one `workers` stage, as before.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from ops.scaling import advise
from streams.config import Settings
from streams.fleet import WORKERS_STAGE, Fleet, fleet_from_states, load_fleet
from streams.kafka import check_reachable
from streams.lag import pipeline_stages
from streams.outgoing import now_ms
from streams.pressure_feed import PressureListener

STATE_WAIT_S = 3.0


def is_workers_stage(stage: str) -> bool:
    """The workers' stage or a pool's (`workers.<pool>`)."""
    return stage == WORKERS_STAGE or stage.startswith(WORKERS_STAGE + ".")


def stage_names(settings: Settings, fleet: Fleet) -> list[str]:
    """The stages to advise on, in order: those before the workers, then each pool's."""
    before = [s.name for s in pipeline_stages(settings) if not is_workers_stage(s.name)]
    return list(dict.fromkeys([*before, *(pool.stage for pool in fleet.pools.values())]))


def advice_row(stage: str, state: Mapping[str, Any] | None, target_s: float) -> dict[str, Any]:
    """One stage's (one pool's) advice from its PressureState."""
    if state is None:
        return {"stage": stage, "recommended": None, "reason": "no state published: is the lag monitor up?"}
    a = advise(
        stage,
        members=state.get("members", -1) if state.get("members", -1) >= 0 else 1,
        partitions=state.get("partitions") or 1,
        arrival_rate=state.get("arrival_rate", 0.0),
        drain_rate=state["drain_rate"],
        lag=state["lag"],
        target_s=target_s,
    )
    return {"stage": a.stage, "current": a.current, "recommended": a.recommended, "reason": a.reason}


def advice_rows(settings: Settings, target_s: float) -> list[dict[str, Any]]:
    """:raises FleetError: the fleet file is wrong (one line per mistake)."""
    fleet = load_fleet(settings)
    listener = PressureListener(settings)
    listener.start()
    try:
        stages = stage_names(settings, fleet)
        deadline = time.monotonic() + STATE_WAIT_S
        while time.monotonic() < deadline and any(listener.board.state(s) is None for s in stages):
            time.sleep(0.05)
        if not settings.fleet_file:  # the pools as their fresh states say, where any does
            since_ms = now_ms() - settings.pressure_stale_s * 1000
            fresh = [state for state in listener.board.states() if state["updated_ms"] >= since_ms]
            learnt = fleet_from_states(fresh)
            if learnt is not None:
                stages = stage_names(settings, learnt)
        return [advice_row(stage, listener.board.state(stage), target_s) for stage in stages]
    finally:
        listener.close()


def report(settings: Settings, target_s: float, as_json: bool) -> int:
    check_reachable(settings.bootstrap)
    rows = advice_rows(settings, target_s)
    if as_json:
        print(orjson.dumps(rows).decode())
    else:
        for r in rows:
            if r["recommended"] is None:
                print(f"{r['stage']}: {r['reason']}")
            else:
                print(f"{r['stage']}: {r['current']} -> {r['recommended']} ({r['reason']})")
    return 0
