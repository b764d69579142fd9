"""A pressure listener starts on a pressure topic whose leader is not elected yet (issue 25, item 8).

`PressureListener.start` reads the topic's watermarks; on a topic created a moment
ago the broker answers NOT_LEADER_FOR_PARTITION until a leader is elected, and the
processors and the gateway (which start a listener) died at start on it; the
autoscaler had its own retry. Now the listener tries again itself, with backoff,
one log line per attempt, bounded. The fault: `pressure.no_leader`, a fault point
that raises that error at its reach (streams/faults.py), armed in this process or
in a processor's environment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import KafkaException

from streams import Client, faults
from streams.config import Settings
from streams.lag import WORKERS
from streams.outgoing import now_ms
from streams.pressure_feed import PressureListener
from tests.conftest import Pipeline
from tests.helpers import wait_for
from tests.test_autoscaler_faults import workers_full

FAULT = "pressure.no_leader"


@pytest.fixture
def no_leader_at_first() -> Iterator[None]:
    """Arms the fault point in this process for its first reach (as TIDEGATE_FAULTS=pressure.no_leader)."""
    faults._ARMED[FAULT] = 1
    faults._REACHED.pop(FAULT, None)
    try:
        yield
    finally:
        faults._ARMED.pop(FAULT, None)
        faults._REACHED.pop(FAULT, None)


def test_a_listener_started_before_its_topic_has_a_leader_tries_again(
    settings_factory: Callable[..., Settings], no_leader_at_first: None, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_factory()
    caplog.set_level(logging.WARNING, logger="streams.pressure_feed")
    listener = PressureListener(settings)
    try:
        listener.start()  # raised NOT_LEADER_FOR_PARTITION before
        attempts = [r.getMessage() for r in caplog.records if "pressure topic not read yet" in r.getMessage()]
        assert len(attempts) == 1 and "NOT_LEADER_FOR_PARTITION" in attempts[0], attempts
        workers_full(settings, now_ms())
        wait_for(lambda: listener.board.state(WORKERS), 15, "a state read after the retried start")
    finally:
        listener.close()


def test_a_listener_gives_up_after_its_bound(
    settings_factory: Callable[..., Settings], no_leader_at_first: None
) -> None:
    """Bounded: past `give_up_s` the error is raised, not retried for ever."""
    listener = PressureListener(settings_factory())
    started = time.monotonic()
    with pytest.raises(KafkaException, match="NOT_LEADER_FOR_PARTITION"):
        listener.start(give_up_s=0.1)
    assert time.monotonic() - started < 5
    listener.close()


def test_a_processor_started_before_the_pressure_topic_has_a_leader_starts(
    pipeline_factory: Callable[..., Pipeline],
) -> None:
    pipeline = pipeline_factory(roles=(), backpressure=True)
    pipeline.start(("processor",), extra_env={"TIDEGATE_FAULTS": FAULT})  # died before: never ready
    log_text = (pipeline.log_dir / "processors.log").read_text(errors="replace")
    assert "attempt=1 pressure topic not read yet" in log_text


def test_a_client_started_before_the_pressure_topic_has_a_leader_starts(
    settings_factory: Callable[..., Settings], no_leader_at_first: None
) -> None:
    """The gateway's way in: its Client starts a listener (it raised, the gateway died)."""
    settings = settings_factory()

    async def start() -> None:
        async with Client(settings=settings) as client:
            workers_full(settings, now_ms())
            while client.pressure(WORKERS) is None:
                await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(start(), 30))
