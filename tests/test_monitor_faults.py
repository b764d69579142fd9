"""The lag monitor survives transient faults and its restarts (issue 25, item 8).

- A transient error of its tail's consumer (injected: `lag-tail-error@2`, the
  point's second reach, in the tail between two samples) used to end the process.
- A monitor started before its topics existed exited (the supervisor restarted it,
  from nothing).
- A restarted monitor measured the drain rates afresh: every seconds-cap fell to its
  floor and a burst of `queue_full` followed. It resumes from the last state on the
  compacted pressure topic."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, Producer, TopicPartition

from streams.config import Settings
from streams.kafka import connection_config, create_topics
from streams.lag import PROCESSORS
from streams.lifecycle import READY_MARKER
from streams.outgoing import now_ms
from streams.pressure_feed import PressureListener
from tests.conftest import BROKER, LOG_DIR, Pipeline, settings_env
from tests.helpers import wait_for
from tidegate import devstack
from tidegate.processes import stop_pid

BACKLOG = 4000
COMMIT_STEP = 40  # records per 0.1 s: a drain rate of ~400/s
FLOOR = 8 * 4  # PROCESSOR_BATCH 8 x FLOOR_BATCHES


def alive(pid: int) -> bool:
    return os.waitpid(pid, os.WNOHANG) == (0, 0)


def test_the_monitor_survives_a_transient_tail_error(pipeline_factory: Callable[..., Pipeline]) -> None:
    pipeline = pipeline_factory(roles=())
    pipeline.start(("monitor",), extra_env={"TIDEGATE_FAULTS": "lag-tail-error@2"})
    log_path = pipeline.log_dir / "ops.log"
    listener = PressureListener(pipeline.settings)
    listener.start()
    try:
        wait_for(
            lambda: (
                "injected by TIDEGATE_FAULTS" in log_path.read_text(errors="replace")
                or not alive(pipeline.pids["monitor"])
            ),
            15,
            "the injected error",
        )
        after = now_ms()
        wait_for(
            lambda: (listener.board.state(PROCESSORS) or {}).get("updated_ms", 0) > after + 1500,
            15,
            "states published after the error",
        )
        assert alive(pipeline.pids["monitor"]), log_path.read_text(errors="replace")[-2000:]
    finally:
        listener.close()


def test_a_restarted_monitor_resumes_the_drain_rate_and_cap(pipeline_factory: Callable[..., Pipeline]) -> None:
    """The processors' group drains ~400/s (commits made here, as a group with no live
    member); the monitor is SIGKILLed and started again: its first state carries the
    drain rate and cap of the last one, not a rate of 0 and the cap's floor."""
    pipeline = pipeline_factory(roles=("monitor",), processor_batch=8, processors_cap_seconds=2.0)
    settings = pipeline.settings
    producer = Producer(connection_config(settings))
    for _ in range(BACKLOG):
        producer.produce(settings.topics.requests, b"x", partition=0)
    assert producer.flush(30) == 0
    committer = Consumer({**connection_config(settings), "group.id": settings.processor_group})
    done = threading.Event()

    def drain() -> None:
        offset = 0
        while not done.wait(0.1) and offset < BACKLOG - 400:
            offset += COMMIT_STEP
            committer.commit(offsets=[TopicPartition(settings.topics.requests, 0, offset)], asynchronous=False)

    listener = PressureListener(settings)
    listener.start()
    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        state = wait_for(
            lambda: (s := listener.board.state(PROCESSORS)) and s["drain_rate"] > 200 and s["cap"] > 4 * FLOOR and s,
            30,
            "a measured drain rate and a cap above the floor",
        )
        done.set()
        drainer.join(5)
        before = listener.board.state(PROCESSORS)
        assert before is not None
        os.kill(pipeline.pids["monitor"], 9)
        pipeline.wait_exited("monitor", 10)
        restarted_ms = now_ms()
        pipeline.start(("monitor",))
        first = wait_for(
            lambda: (s := listener.board.state(PROCESSORS)) and s["updated_ms"] > restarted_ms and s,
            30,
            "the restarted monitor's first state",
        )
        print(
            f"MONITOR before kill: cap {before['cap']} drain {before['drain_rate']}/s; "
            f"after restart: cap {first['cap']} drain {first['drain_rate']}/s (was {state['cap']} when seen)"
        )
        # resumed from the last state on the topic: the one read here, or one just
        # before it where the topic's end is read early (Tansu's ListOffsets)
        assert first["drain_rate"] >= 0.5 * before["drain_rate"] > 0
        assert first["cap"] >= 2 * FLOOR
    finally:
        done.set()
        listener.close()
        committer.close()


def test_a_monitor_started_before_its_topics_waits_for_them(services: tuple[str, str]) -> None:
    """Started before the topics exist (topics created after the stages, a broker
    between lives), the monitor used to exit; it tries again and becomes ready once
    they are there."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        bootstrap=services[0],
        redis_url=services[1],
        broker=BROKER,
        topic_prefix=f"t{tag}.",
        processor_group=f"processors-{tag}",
        worker_group=f"workers-{tag}",
    )
    log_dir = LOG_DIR / f"monitor-early-{tag}"
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = devstack.start_stage("ops", settings_env(settings), log_dir)
    log_path = log_dir / "ops.log"
    try:
        wait_for(
            lambda: (
                proc.poll() is not None or "attempt=1 lag monitor not started" in log_path.read_text(errors="replace")
            ),
            30,
            "the monitor's first try",
        )
        assert proc.poll() is None, log_path.read_text(errors="replace")[-2000:]
        create_topics(settings)
        devstack.wait_for_ready(log_path, READY_MARKER, proc, 60)
    finally:
        stop_pid(proc.pid)
