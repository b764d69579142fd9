"""The autoscaler on faults (issue 25, item 8): it acted on whatever state it held last
(a monitor gone for minutes still drove it) and died on the first scale that failed.

The dev stack here is a real state file and supervisor plan with a supervisor that
does not answer (a process of this test that ignores SIGHUP): every scale times out."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from schemas import AVRO, content_type_header, get_codec
from streams.config import Settings
from streams.kafka import producer_config
from streams.lag import WORKERS
from streams.outgoing import now_ms
from tests.conftest import SettingsFactory
from tests.helpers import wait_for
from tidegate.autoscaler import Autoscaler, Limits
from tidegate.devstack import DevStack
from tidegate.processes import stop_pid
from tidegate.supervisor import Plan

DEAF = "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); time.sleep(300)"


@pytest.fixture
def deaf_stack(settings_factory: SettingsFactory, tmp_path: Path) -> Iterator[tuple[Settings, DevStack]]:
    settings = settings_factory()
    supervisor = subprocess.Popen([sys.executable, "-c", DEAF])
    state_file = tmp_path / "stack.json"
    stack = DevStack(settings.bootstrap, settings.redis_url, log_dir=str(tmp_path))
    stack.pids = {"supervisor": supervisor.pid, "worker": [supervisor.pid]}  # one worker, never signalled
    stack.save(state_file)
    Plan(env={}, log_dir=str(tmp_path), state_file=str(state_file), counts={"worker": 1}).save(
        tmp_path / "supervisor-plan.json"
    )
    try:
        yield settings, stack
    finally:
        stop_pid(supervisor.pid)


def workers_full(settings: Settings, updated_ms: int) -> None:
    """Publishes a workers' state past its cap, as the monitor would."""
    state = {
        "stage": WORKERS,
        "lag": 900,
        "cap": 100,
        "state": "full",
        "drain_rate": 20.0,
        "drain_time_ms": 45_000,
        "updated_ms": updated_ms,
        "lag_seconds": 45.0,
        "lag_seconds_interpolated": 45.0,
        "health": "OK",
        "partition_health": {},
        "arrival_rate": 60.0,
        "members": 1,
        "partitions": 8,
    }
    producer = Producer(producer_config(settings))
    producer.produce(
        settings.topics.pressure,
        get_codec().encode("PressureState", state),
        WORKERS.encode(),
        headers=[content_type_header(AVRO)],
    )
    assert producer.flush(10) == 0


def run_in_thread(scaler: Autoscaler) -> threading.Thread:
    thread = threading.Thread(target=scaler.run, daemon=True)
    thread.start()
    return thread


def test_a_failed_scale_is_tried_again_and_the_autoscaler_goes_on(
    deaf_stack: tuple[Settings, DevStack], caplog: pytest.LogCaptureFixture
) -> None:
    settings, stack = deaf_stack
    scaler = Autoscaler(stack, settings, Limits(max_workers=4, out_cooldown_s=1.0, scale_timeout_s=1.0))
    caplog.set_level(logging.INFO, logger="tidegate.autoscaler")
    thread = run_in_thread(scaler)
    keep_publishing = threading.Event()

    def monitor() -> None:  # a fresh state every half second
        while not keep_publishing.wait(0.5):
            workers_full(settings, now_ms())

    publisher = threading.Thread(target=monitor, daemon=True)
    publisher.start()
    try:

        def failures() -> int:
            return sum("failed, trying again" in r.getMessage() for r in caplog.records)

        wait_for(lambda: failures() >= 2 or not thread.is_alive(), 30, "two failed scales")
        assert thread.is_alive(), "the autoscaler died on a failed scale"
        assert failures() >= 2
    finally:
        keep_publishing.set()
        scaler.stopping.set()
        thread.join(10)


def test_a_stale_state_is_not_acted_on(deaf_stack: tuple[Settings, DevStack], caplog: pytest.LogCaptureFixture) -> None:
    """The monitor's last state is 10 s old (PRESSURE_STALE_S is 3): checks pass it
    over; a fresh one of the same content is acted on (the scale then fails: deaf)."""
    settings, stack = deaf_stack
    workers_full(settings, now_ms() - 10_000)
    scaler = Autoscaler(stack, settings, Limits(max_workers=4, out_cooldown_s=0.0, scale_timeout_s=1.0))
    caplog.set_level(logging.INFO, logger="tidegate.autoscaler")
    scaler.start_listener()
    try:
        wait_for(lambda: scaler.listener.board.state(WORKERS), 10, "the stale state read")
        for _ in range(3):
            scaler.check(time.monotonic())
        assert "scale out" not in caplog.text, caplog.text
        assert Plan.load(Path(stack.log_dir) / "supervisor-plan.json").counts == {"worker": 1}

        workers_full(settings, now_ms())
        wait_for(lambda: scaler.listener.board.state(WORKERS)["updated_ms"] > now_ms() - 3000, 10, "the fresh state")
        scaler.check(time.monotonic())
        assert "scale out 1 -> " in caplog.text
    finally:
        scaler.listener.close()
