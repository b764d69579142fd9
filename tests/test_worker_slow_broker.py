"""Issue 25, item 8: an idle worker survives a broker slow to acknowledge its replies.

An idle worker waits for the broker's acknowledgements before it waits for work
(`continuous_round`: flush, then commit). A flush that ran out after 10 s with a
reply still unacknowledged raised DeliveryError and the worker exited, though the
broker was only slow (a leader election). The fault: the broker paused (SIGSTOP)
while the worker generates, for as long as it takes the worker's flush to run out,
then resumed. Why a paused broker: it is what a slow broker looks like to the
worker's producer (the connection stays up, the request stays unanswered), and it
leaves the worker's code unchanged; a fault point inside the worker would have to
pretend a flush ran out. The worker must live on, the reply reach its caller, and
nothing be committed past the reply before the broker acknowledged it (the lag
ends at 0 once it did).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams import Client, Settings
from streams.kafka import create_topics
from streams.reply import Chunk
from tests.conftest import LOG_DIR, Pipeline
from tests.helpers import wait_for, wait_for_stage_lag
from tidegate import devstack
from tidegate.processes import free_port, stop_pid

pytestmark = pytest.mark.kafka_only

FLUSH_WAIT_S = 10  # the idle worker's flush (inference/worker.py continuous_round)


@pytest.fixture
def own_stack(request: pytest.FixtureRequest) -> Iterator[tuple[int, Pipeline]]:
    """A Kafka node of this test's own (the session broker is never paused), a
    redis-server, a processor and a tiny-model worker streaming every decode step."""
    log_dir = LOG_DIR / f"{request.node.name}-{uuid.uuid4().hex[:6]}"
    brokers = devstack.start_brokers("kafka", 1, log_dir / "state", log_dir)
    redis_port = free_port()
    redis = devstack.start_redis(redis_port, log_dir)
    settings = Settings(
        bootstrap=brokers.bootstrap,
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        model="tiny",
        torch_threads=1,
        stream_interval_ms=0,
        workers_cap_messages=10_000,
        processors_cap_messages=10_000,
    )
    create_topics(settings)
    pipeline = Pipeline(settings, log_dir)
    try:
        pipeline.start(("processor", "worker"))
        yield brokers.pids[0], pipeline
    finally:
        os.kill(brokers.pids[0], signal.SIGCONT)  # never leave it stopped
        pipeline.stop()
        stop_pid(redis.pid)
        brokers.stop()


def _exited(pid: int) -> bool:
    done, _ = os.waitpid(pid, os.WNOHANG)
    return bool(done)


@pytest.mark.timeout(300)
def test_an_idle_worker_waits_out_a_broker_slow_to_acknowledge(own_stack: tuple[int, Pipeline]) -> None:
    broker, pipeline = own_stack
    worker = pipeline.pids["worker"]
    worker_log = Path(pipeline.log_dir) / "inference.log"
    paused_at: list[float] = []

    def pause_once(chunk: Chunk) -> None:
        if chunk.text and not paused_at:  # generating: its reply comes while the broker is stopped
            os.kill(broker, signal.SIGSTOP)
            paused_at.append(time.time())

    def flush_ran_out() -> bool:
        """The worker's flush ran out with the reply unacknowledged: it logged so and
        waits on (fixed), or died of it (before)."""
        return _exited(worker) or "not acknowledged" in worker_log.read_text(errors="replace")

    async def scenario() -> list[Chunk]:
        async with Client(settings=pipeline.settings) as client:
            got: list[Chunk] = []
            messages = [{"role": "user", "content": "go on and on"}]
            async for chunk in client.stream(messages, "slow", max_new_tokens=1024, deadline_s=180):
                got.append(chunk)
                if not paused_at:
                    pause_once(chunk)
                    await asyncio.to_thread(wait_for, flush_ran_out, FLUSH_WAIT_S + 50, "the worker's flush to run out")
                    resumed_at.append(time.time())
                    os.kill(broker, signal.SIGCONT)
            return got

    resumed_at: list[float] = []
    try:
        got = asyncio.run(scenario())
    finally:
        os.kill(broker, signal.SIGCONT)
    assert not _exited(worker), "the worker exited on a slow flush"
    reply = got[-1].reply
    assert reply is not None and reply.ok, reply
    assert "".join(c.text for c in got) == reply.text
    assert len({c.generation for c in got[:-1]}) == 1 and got[0].generation  # the worker names its run
    # the window was hit: the reply was produced while the broker was stopped, at
    # least the flush's wait before it was resumed
    assert paused_at[0] * 1000 <= reply.replied_ms <= (resumed_at[0] - FLUSH_WAIT_S) * 1000
    wait_for_stage_lag(pipeline.settings, "workers", 0, 60)
    assert not _exited(worker)
