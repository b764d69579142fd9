"""`tidegate scale advise`'s arithmetic (ops/scaling.py), and its and the autoscaler's
choices per pool of a fleet (ops/scale_report.py, tidegate/autoscaler.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from ops.scaling import advise, drain_time_s
from streams.config import Settings
from tidegate.autoscaler import Autoscaler, Limits
from tidegate.devstack import DevStack


def test_scale_out_to_keep_up_and_clear_the_backlog_within_the_target() -> None:
    # one member drains 50/s; 120/s arrive and 300 wait: (120 + 300 / 10) / 50 = 3
    a = advise("workers", members=1, partitions=8, arrival_rate=120, drain_rate=50, lag=300, target_s=10)
    assert a.recommended == 3 and a.change == 2 and "scale out to 3" in a.reason


def test_capped_at_the_partitions() -> None:
    a = advise("workers", members=4, partitions=8, arrival_rate=2000, drain_rate=200, lag=0, target_s=10)
    assert a.recommended == 8 and "capped at 8 partitions: add partitions" in a.reason


def test_scale_in_when_fewer_keep_up() -> None:
    a = advise("workers", members=4, partitions=8, arrival_rate=30, drain_rate=200, lag=0, target_s=10)
    assert a.recommended == 1 and "scale in" in a.reason


def test_without_a_measured_drain_rate_the_group_is_kept() -> None:
    a = advise("workers", members=2, partitions=8, arrival_rate=10, drain_rate=0, lag=5, target_s=10)
    assert a.recommended == 2 and "no drain rate" in a.reason


def test_drain_time_is_lag_over_the_net_drain() -> None:
    assert drain_time_s(100, drain_rate=30, arrival_rate=10) == 5.0
    assert drain_time_s(0, drain_rate=0, arrival_rate=0) == 0.0
    assert drain_time_s(100, drain_rate=10, arrival_rate=10) == -1.0  # never drains


# -- per pool (issue 26, item 6): each pool's state gives its own advice and decision

FLEET = """
models:
  smol: {token_budget: 1024}
pools:
  fast: {engine: "sim:5", models: [smol], partitions: 2, workers_cap_seconds: 2}
  spare: {engine: echo, models: [smol], partitions: 8}
"""


def pool_state(stage: str, **fields: object) -> dict:
    """A PressureState as the monitor publishes it for `stage`, now."""
    from streams.outgoing import now_ms

    state = {
        "stage": stage,
        "lag": 0,
        "cap": 100,
        "state": "ok",
        "drain_rate": 20.0,
        "updated_ms": now_ms(),
        "lag_seconds": 0.0,
        "arrival_rate": 0.0,
        "members": 1,
        "partitions": 8,
    }
    return {**state, **fields}


def fleet_settings(tmp_path: Path) -> Settings:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    return Settings(fleet_file=str(path))


def test_scale_advise_names_each_pools_stage_and_only_the_workers_stage_without_a_fleet(tmp_path: Path) -> None:
    from ops.scale_report import stage_names
    from streams.fleet import load_fleet

    plain = Settings()
    assert stage_names(plain, load_fleet(plain)) == ["processors", "workers"]  # as before
    settings = fleet_settings(tmp_path)
    assert stage_names(settings, load_fleet(settings)) == ["processors", "workers.fast", "workers.spare"]


def test_a_pools_advice_is_bounded_by_its_own_partitions() -> None:
    from ops.scale_report import advice_row

    busy = pool_state("workers.fast", lag=400, arrival_rate=100.0, partitions=2)
    row = advice_row("workers.fast", busy, target_s=10)
    assert row["stage"] == "workers.fast" and row["recommended"] == 2 and "capped at 2 partitions" in row["reason"]
    assert advice_row("workers.spare", None, 10)["recommended"] is None
    assert set(advice_row("workers", pool_state("workers"), 10)) == {"stage", "current", "recommended", "reason"}


def autoscaler(tmp_path: Path, settings: Settings, pids: dict) -> Autoscaler:
    stack = DevStack("127.0.0.1:1", "redis://127.0.0.1:1/0", log_dir=str(tmp_path), pids=pids)
    return Autoscaler(stack, settings, Limits(max_workers=8, out_cooldown_s=5.0, in_cooldown_s=5.0))


def test_the_autoscaler_scales_each_pool_on_its_own_state_and_cooldown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fast pool is behind: it scales out, capped at its 2 partitions, with its own
    target (its workers_cap_seconds); the spare pool, calm, is left; the fast pool's
    change starts no cooldown of the spare pool's."""
    scaled: list[dict] = []

    def fake_scale(stack: DevStack, counts: dict, timeout_s: float) -> DevStack:
        scaled.append(dict(counts))
        for role, n in counts.items():
            stack.pids[role] = list(range(100, 100 + n))
        return stack

    monkeypatch.setattr("tidegate.autoscaler.devstack.scale", fake_scale)
    caplog.set_level(logging.INFO, logger="tidegate.autoscaler")
    scaler = autoscaler(tmp_path, fleet_settings(tmp_path), {"worker.fast": 1, "worker.spare": 1})
    assert {t.role for t in scaler.tracks.values()} == {"worker.fast", "worker.spare"}
    board = scaler.listener.board
    # 3 s behind against the fast pool's 2 s target (the spare pool's would be 4 s)
    board.publish(
        pool_state("workers.fast", lag=300, arrival_rate=100.0, drain_rate=20.0, lag_seconds=3.0, partitions=2)
    )
    board.publish(pool_state("workers.spare"))
    scaler.check(100.0)
    assert scaled == [{"worker.fast": 2}]
    assert "pool=fast scale out 1 -> 2" in caplog.text
    assert scaler.tracks["spare"].changed_at == 0.0 and scaler.tracks["fast"].changed_at == 100.0

    time.sleep(0.002)  # a state measured after the change
    board.publish(pool_state("workers.spare", lag=500, arrival_rate=100.0, lag_seconds=9.0))
    board.publish(pool_state("workers.fast", lag=300, arrival_rate=100.0, lag_seconds=3.0, partitions=2, members=2))
    scaler.check(101.0)  # the spare pool's own cooldown has not begun; the fast pool is at its partitions
    assert scaled[1:] == [{"worker.spare": 8}], scaled


def test_without_a_fleet_the_autoscaler_acts_on_the_workers_stage_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    scaled: list[dict] = []
    monkeypatch.setattr("tidegate.autoscaler.devstack.scale", lambda stack, counts, t: scaled.append(counts) or stack)
    caplog.set_level(logging.INFO, logger="tidegate.autoscaler")
    scaler = autoscaler(tmp_path, Settings(), {"worker": 1})
    assert [(t.role, t.pool.stage) for t in scaler.tracks.values()] == [("worker", "workers")]
    scaler.listener.board.publish(pool_state("workers", state="full", lag=900, arrival_rate=60.0, lag_seconds=45.0))
    scaler.check(100.0)
    assert scaled == [{"worker": 8}]  # (60/s + 900 / 4 s) / 20/s per member: 15, capped at the 8 partitions
    assert "scale out 1 -> 8: " in caplog.text and "pool=" not in caplog.text
