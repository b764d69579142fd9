"""`tidegate lag`: each stage's lag now, with the cap and state the monitor last published."""

from __future__ import annotations

import time
from typing import Any

import orjson

from streams.config import Settings
from streams.kafka import check_reachable
from streams.lag import LagReader, pipeline_stages
from streams.pressure_feed import PressureListener

STATE_WAIT_S = 1.5  # the monitor publishes every stage at least once a second


def lag_rows(reader: LagReader, listener: PressureListener) -> list[dict[str, Any]]:
    reader.poll(0.2)
    rows = []
    for stage in reader.stages:
        lag = reader.lag(stage)
        state = listener.board.state(stage.name) or {}
        rows.append(
            {
                "stage": stage.name,
                "topic": stage.topic,
                "group": stage.group,
                "lag": lag.lag,
                "log_end": lag.log_end,
                "committed": lag.committed,
                "cap": state.get("cap"),
                "state": state.get("state", "unknown (no monitor)"),
                "drain_rate": state.get("drain_rate"),
                "drain_time_ms": state.get("drain_time_ms"),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = f"{'stage':<11} {'lag':>8} {'cap':>8} {'state':<8} {'drain/s':>9} {'drain time':>11}  group"
    lines = [head]
    for r in rows:
        drain = "-" if r["drain_rate"] is None else f"{r['drain_rate']:.1f}"
        drain_time = "-" if r["drain_time_ms"] in (None, -1) else f"{r['drain_time_ms'] / 1000:.1f}s"
        cap = "-" if r["cap"] is None else str(r["cap"])
        lines.append(
            f"{r['stage']:<11} {r['lag']:>8} {cap:>8} {r['state']:<8} {drain:>9} {drain_time:>11}  {r['group']}"
        )
    return "\n".join(lines)


def report(settings: Settings, as_json: bool, watch_s: float | None) -> int:
    check_reachable(settings.bootstrap)
    reader = LagReader(settings, pipeline_stages(settings))
    listener = PressureListener(settings)
    listener.start()
    try:
        deadline = time.monotonic() + STATE_WAIT_S
        while time.monotonic() < deadline and any(listener.board.state(s.name) is None for s in reader.stages):
            reader.poll(0.1)
        while True:
            rows = lag_rows(reader, listener)
            print(orjson.dumps(rows).decode() if as_json else format_rows(rows), flush=True)
            if watch_s is None:
                return 0
            reader.poll(watch_s)
    finally:
        listener.close()
        reader.close()
