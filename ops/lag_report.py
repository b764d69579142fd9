"""`tidegate lag`: each stage's lag now, with what the lag monitor last published:
cap, pressure state, the circuit, lag in seconds, health by Burrow's rules, drain
and arrival rates, drain time, members against partitions. `--watch` keeps a live
table. The workers are a row per pool of the fleet (`workers.<pool>`; `workers` for
the `default` pool), each with its circuit: `closed`, `half_open` (and its probes)
or `open` (and the seconds until it half-opens, and why)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from ops.scaling import drain_time_s
from streams.config import Settings
from streams.fleet import fleet_from_states, pool_names
from streams.kafka import check_reachable
from streams.lag import PROCESSORS, LagReader, Stage, pipeline_stages
from streams.outgoing import now_ms
from streams.pressure_feed import PressureListener

STATE_WAIT_S = 1.5  # the monitor publishes every stage at least once a second
COLUMNS = (
    "stage",
    "lag",
    "lag s",
    "cap",
    "state",
    "circuit",
    "health",
    "drain/s",
    "arrive/s",
    "drain time",
    "members",
    "group",
)


def circuit_cell(r: dict[str, Any]) -> str:
    """`closed`; `half_open 5 probes`; `open 7s no_members` (seconds until it half-opens)."""
    circuit = r.get("circuit")
    if not circuit:
        return "-"  # not a pool's stage, or a monitor that predates circuits
    if circuit == "open":
        left = max(0.0, ((r.get("circuit_until_ms") or 0) - now_ms()) / 1000)
        return f"open {left:.0f}s {r.get('circuit_reason') or ''}".rstrip()
    if circuit == "half_open":
        return f"half_open {r.get('probes', 0)} probes"
    return circuit


def lag_rows(reader: LagReader, listener: PressureListener) -> list[dict[str, Any]]:
    reader.poll(0.2)
    rows = []
    for stage in reader.stages:
        lag = reader.lag(stage)
        state = listener.board.state(stage.name) or {}
        drain, arrival = state.get("drain_rate"), state.get("arrival_rate")
        rows.append(
            {
                "stage": stage.name,
                "topic": stage.topic,
                "topics": reader.topics(stage),  # with TENANT_TOPICS, the tenants' request topics too
                "group": stage.group,
                "lag": lag.lag,
                "log_end": lag.log_end,
                "committed": lag.committed,
                "lag_seconds": state.get("lag_seconds", round(lag.lag_seconds, 3)),
                "cap": state.get("cap"),
                "state": state.get("state", "unknown (no monitor)"),
                "health": state.get("health", "unknown"),
                "partition_health": state.get("partition_health", {}),
                "drain_rate": drain,
                "arrival_rate": arrival,
                "drain_time_s": None if drain is None else drain_time_s(lag.lag, drain, arrival or 0.0),
                "members": state.get("members"),
                "partitions": state.get("partitions") or reader.partition_count(stage),
                # a pool's (the workers' stages): which, serving what, and its circuit
                "pool": state.get("pool") or None,
                "models": [m["id"] for m in state.get("models") or []],
                "circuit": state.get("circuit") if state.get("pool") else None,
                "circuit_until_ms": state.get("circuit_until_ms"),
                "circuit_reason": state.get("circuit_reason") or None,
                "probes": state.get("probes"),
            }
        )
    return rows


def _cells(r: dict[str, Any]) -> list[str]:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    drain_time = r["drain_time_s"]
    members = r["members"]
    return [
        r["stage"],
        str(r["lag"]),
        num(r["lag_seconds"], ".1f"),
        "-" if r["cap"] is None else str(r["cap"]),
        r["state"],
        circuit_cell(r),
        r["health"],
        num(r["drain_rate"], ".1f"),
        num(r["arrival_rate"], ".1f"),
        "-" if drain_time is None else ("never" if drain_time < 0 else f"{drain_time:.1f}s"),
        f"{'?' if members is None or members < 0 else members}/{r['partitions']}",
        r["group"],
    ]


def format_rows(rows: list[dict[str, Any]]) -> str:
    table = [list(COLUMNS), *(_cells(r) for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table)


def _rich_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    colours = {"ok": "green", "OK": "green", "warn": "yellow", "WARN": "yellow", "full": "red", "ERR": "red"}
    circuits = {"closed": "green", "half_open": "yellow", "open": "red"}
    table = Table(title=f"tidegate lag  {time.strftime('%H:%M:%S')}", title_justify="left")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in ("stage", "state", "circuit", "health", "group") else "right")
    for r in rows:
        cells = _cells(r)
        cells[4] = f"[{colours.get(r['state'], 'white')}]{cells[4]}[/]"
        cells[5] = f"[{circuits.get(r['circuit'] or '', 'white')}]{cells[5]}[/]"
        cells[6] = f"[{colours.get(r['health'], 'white')}]{cells[6]}[/]"
        table.add_row(*cells)
    return table


def learnt_stages(settings: Settings, listener: PressureListener, stages: list[Stage]) -> list[Stage]:
    """Without a fleet file here, the pools as their fresh states on the pressure topic
    name them (as a client learns the fleet): a row per pool all the same. `stages`
    where there is a fleet file, or no state names a pool but `default`."""
    if settings.fleet_file:
        return stages
    since_ms = now_ms() - settings.pressure_stale_s * 1000
    learnt = fleet_from_states(s for s in listener.board.states() if s["updated_ms"] >= since_ms)
    if learnt is None or learnt.single:
        return stages
    pools = [Stage(pool.stage, *pool_names(settings, pool.name)[:2]) for pool in learnt.pools.values()]
    return [s for s in stages if s.name == PROCESSORS] + pools


def report(settings: Settings, as_json: bool, watch_s: float | None) -> int:
    check_reachable(settings.bootstrap)
    reader = LagReader(settings, pipeline_stages(settings))
    listener = PressureListener(settings)
    listener.start()
    try:
        deadline = time.monotonic() + STATE_WAIT_S
        while time.monotonic() < deadline and any(listener.board.state(s.name) is None for s in reader.stages):
            reader.poll(0.1)
        stages = learnt_stages(settings, listener, reader.stages)
        if stages != reader.stages:
            reader.close()
            reader = LagReader(settings, stages)
        if watch_s is not None and not as_json:
            from rich.live import Live

            with Live(_rich_table(lag_rows(reader, listener)), auto_refresh=False) as live:
                while True:
                    reader.poll(watch_s)
                    live.update(_rich_table(lag_rows(reader, listener)), refresh=True)
        while True:
            rows = lag_rows(reader, listener)
            print(orjson.dumps(rows).decode() if as_json else format_rows(rows), flush=True)
            if watch_s is None:
                return 0
            reader.poll(watch_s)
    finally:
        listener.close()
        reader.close()
