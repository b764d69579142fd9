"""`tidegate scale advise`: members per stage from what the lag monitor publishes."""

from __future__ import annotations

import time
from typing import Any

import orjson

from ops.scaling import advise
from streams.config import Settings
from streams.kafka import check_reachable
from streams.lag import pipeline_stages
from streams.pressure_feed import PressureListener

STATE_WAIT_S = 3.0


def advice_rows(settings: Settings, target_s: float) -> list[dict[str, Any]]:
    listener = PressureListener(settings)
    listener.start()
    try:
        stages = pipeline_stages(settings)
        deadline = time.monotonic() + STATE_WAIT_S
        while time.monotonic() < deadline and any(listener.board.state(s.name) is None for s in stages):
            time.sleep(0.05)
        rows = []
        for stage in stages:
            state = listener.board.state(stage.name)
            if state is None:
                rows.append(
                    {"stage": stage.name, "recommended": None, "reason": "no state published: is the lag monitor up?"}
                )
                continue
            a = advise(
                stage.name,
                members=state.get("members", -1) if state.get("members", -1) >= 0 else 1,
                partitions=state.get("partitions") or 1,
                arrival_rate=state.get("arrival_rate", 0.0),
                drain_rate=state["drain_rate"],
                lag=state["lag"],
                target_s=target_s,
            )
            rows.append({"stage": a.stage, "current": a.current, "recommended": a.recommended, "reason": a.reason})
        return rows
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
