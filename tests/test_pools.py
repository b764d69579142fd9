"""The pools' side of the lag monitor without a broker (ops/pools.py): caps, the fields
a pool's PressureState carries, its circuit judged from a sample, the `tidegate lag`
circuit column, and a monitor with a bad fleet file exiting with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ops.breaker import NO_MEMBERS, OPEN
from ops.burrow import OK, STOP
from ops.lag_report import circuit_cell
from ops.pools import PoolStates, pool_caps, pool_fields
from streams.config import Settings
from streams.fleet import load_fleet
from streams.lag import PartitionLag, StageLag, pipeline_stages
from streams.outgoing import now_ms
from streams.pressure import stage_caps

ROOT = Path(__file__).resolve().parent.parent
FLEET = """
models:
  smol: {aliases: [gpt-4o-mini], token_budget: 512, fallbacks: [tiny]}
  tiny: {token_budget: 256}
pools:
  fast: {engine: "sim:1", models: [smol], max_batch: 4, workers_cap_seconds: 2}
  spare: {engine: echo, models: [smol, tiny], weight: 2, workers_cap_messages: 300, partitions: 3}
"""


def fleet_settings(tmp_path: Path, **overrides: object) -> Settings:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    return Settings(fleet_file=str(path), max_batch=16, worker_group="w", **overrides)  # type: ignore[arg-type]


def stage_lag(stage: str, lags: dict[str, int]) -> StageLag:
    partitions = {p: PartitionLag("t", int(p), lag, 0, lag, 0.0, 0.0) for p, lag in lags.items()}
    return StageLag(stage, sum(lags.values()), sum(lags.values()), 0, partitions)


def test_without_a_fleet_file_the_workers_stage_and_cap_are_todays() -> None:
    settings = Settings(max_batch=8, workers_cap_seconds=3.0)
    fleet = load_fleet(settings)
    assert pool_caps(settings, fleet) == {"workers": stage_caps(settings)["workers"]}
    assert [(s.name, s.topic, s.group) for s in pipeline_stages(settings)] == [
        ("processors", "tidegate.requests", "tidegate-processors"),
        ("workers", "tidegate.contexts", "tidegate-workers"),
    ]
    pools = PoolStates(settings, fleet)
    assert pools.tail is None  # no fleet file: no breaker, no outcomes read
    state = {"stage": "workers", "members": 0}
    for _ in range(3):  # empty with work waiting, again and again: the circuit stays closed
        pools.judge("workers", stage_lag("workers", {"0": 5}), {"0": STOP}, state)
    assert state == {
        "stage": "workers",
        "members": 0,
        "pool": "default",
        "models": [{"id": "default", "aliases": [], "token_budget": 1024, "fallbacks": []}],
        "weight": 1.0,
        "circuit": "closed",
        "circuit_until_ms": 0,
        "probes": 0,
        "circuit_reason": "",
    }
    processors: dict[str, object] = {"stage": "processors"}
    pools.judge("processors", stage_lag("processors", {"0": 1}), {}, processors)
    assert processors == {"stage": "processors"}  # not a pool's stage


def test_each_pool_is_a_stage_with_its_own_cap_and_fields(tmp_path: Path) -> None:
    settings = fleet_settings(tmp_path)
    fleet = load_fleet(settings)
    assert [(s.name, s.topic, s.group) for s in pipeline_stages(settings)][1:] == [
        ("workers.fast", "tidegate.contexts.fast", "w.fast"),
        ("workers.spare", "tidegate.contexts.spare", "w.spare"),
    ]
    caps = pool_caps(settings, fleet)
    assert (caps["workers.fast"].messages, caps["workers.fast"].seconds, caps["workers.fast"].floor) == (None, 2, 16)
    assert (caps["workers.spare"].messages, caps["workers.spare"].floor) == (300, 64)  # MAX_BATCH 16 x 4
    assert pool_fields(fleet, fleet.pools["spare"]) == {
        "pool": "spare",
        "models": [
            {"id": "smol", "aliases": ["gpt-4o-mini"], "token_budget": 512, "fallbacks": ["tiny"]},
            {"id": "tiny", "aliases": [], "token_budget": 256, "fallbacks": []},
        ],
        "weight": 2.0,
    }


def test_a_pools_circuit_is_judged_from_its_sample(tmp_path: Path) -> None:
    settings = fleet_settings(tmp_path, circuit_open_s=7.0)
    pools = PoolStates(settings, load_fleet(settings))
    try:
        stalled = stage_lag("workers.fast", {"0": 4, "1": 3, "2": 0})
        state = {"stage": "workers.fast", "members": 1}
        pools.judge("workers.fast", stalled, {"0": STOP, "1": OK, "2": STOP}, state)  # one of two with lag
        assert state["circuit"] == "open" and state["circuit_reason"] == "stalled"
        assert 6_000 < state["circuit_until_ms"] - now_ms() <= 7_000
        spare = {"stage": "workers.spare", "members": 1}
        pools.judge("workers.spare", stage_lag("workers.spare", {"0": 4}), {"0": OK}, spare)
        assert spare["circuit"] == "closed"
        pools.resume(
            "workers.spare", {"circuit": OPEN, "circuit_until_ms": now_ms() + 5000, "circuit_reason": NO_MEMBERS}
        )
        pools.judge("workers.spare", stage_lag("workers.spare", {"0": 4}), {"0": OK}, spare)
        assert (spare["circuit"], spare["circuit_reason"]) == (OPEN, NO_MEMBERS)  # a restart keeps it open
    finally:
        pools.close()


def test_the_lag_tables_circuit_column() -> None:
    soon = now_ms() + 7_400
    assert circuit_cell({"circuit": None}) == "-"
    assert circuit_cell({"circuit": "closed"}) == "closed"
    assert circuit_cell({"circuit": "half_open", "probes": 5}) == "half_open 5 probes"
    assert circuit_cell({"circuit": "open", "circuit_until_ms": soon, "circuit_reason": "errors"}) == "open 7s errors"


def test_a_monitor_with_a_bad_fleet_file_exits_with_one_line_per_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(FLEET.replace('engine: "sim:1", ', "").replace("weight: 2", "weight: -1"))
    done = subprocess.run(
        [sys.executable, "-m", "ops"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "TIDEGATE_FLEET_FILE": str(bad)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert "pools.fast.engine: expected a runner name" in lines[0] and "pools.spare.weight" in lines[1]
    assert all(line.startswith("monitor: ") for line in lines)
