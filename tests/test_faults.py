"""The fault suite: processes die at precise moments (fault-injection points,
streams/faults.py) or under load, and nothing accepted is lost nor handed to a
caller twice. Broker faults (a restart, one of three killed) are in test_brokers.py.

Each case prints a one-line JSON summary (`FAULT {...}`): requests sent, answered,
lost, duplicates handed to the caller, replies repeated on the topic (dropped by
the client), and the recovery time. `make test-faults` runs them and gathers it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from conversation.history import history_key
from inference.session_store import STATS_KEY
from streams import Client, Reply
from streams.lag import WORKERS, LagReader, Stage, pipeline_stages
from tests import helpers
from tests.conftest import LOG_DIR, Pipeline
from tests.helpers import Outcome, fault_summary, wait_for, wait_for_stage_lag
from tidegate import devstack
from tidegate.processes import free_port, stop_pid
from tidegate.supervisor import STAGE_MODULES

RATE_PER_S = 40
LOAD_S = 8.0
ECHO = {"model": "echo", "workers_cap_messages": 10_000, "processors_cap_messages": 10_000}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def pipelines(pipeline_factory: Callable[..., Pipeline]) -> Iterator[Callable[..., Pipeline]]:
    """pipeline_factory, but each pipeline stops at the end of its test (not of the module)."""
    made: list[Pipeline] = []

    def make(roles: tuple[str, ...] = tuple(STAGE_MODULES), **overrides: object) -> Pipeline:
        pipeline = pipeline_factory(roles=roles, **{**ECHO, **overrides})
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.stop()


def one_request_through_a_crash(pipeline: Pipeline, role: str, session: str, text: str) -> tuple[Reply, float]:
    """Sends one request; waits until `role` (armed with a fault point) killed itself,
    restarts it unarmed, and returns the reply with the time from the crash to it."""

    async def scenario() -> tuple[Reply, float]:
        async with Client(
            settings=pipeline.settings, reply_topic=pipeline.settings.topics.replies, reply_grace_s=60
        ) as client:
            request_id = await client.submit(user(text), session, max_new_tokens=8, deadline_s=90)
            await asyncio.to_thread(pipeline.wait_exited, role, 60)
            killed_at = time.monotonic()
            await asyncio.to_thread(pipeline.start, (role,))
            reply = await client.reply(request_id)
            return reply, time.monotonic() - killed_at

    return asyncio.run(scenario())


def history_of(pipeline: Pipeline, session: str) -> list[bytes]:
    return redis.Redis.from_url(pipeline.settings.redis_url).lrange(history_key("default", session), 0, -1)


# the claims are Redis's; a redelivery after a kill is the worker cases' too (kept on Tansu)
@pytest.mark.same_on_any_broker
@pytest.mark.parametrize("point", ["processor.before_forward", "processor.after_forward"])
def test_a_processor_killed_around_forwarding_loses_and_doubles_nothing(
    pipelines: Callable[..., Pipeline], point: str
) -> None:
    """Killed after reading the history and before the envelope is acknowledged, the
    request is forwarded on redelivery (it used to be claimed already, and skipped:
    lost). Killed after the acknowledgement and before the claim, it is forwarded
    twice: the caller sees one reply, and the history holds each turn once."""
    pipeline = pipelines(roles=("monitor", "worker"))
    pipeline.start(("processor",), extra_env={"TIDEGATE_FAULTS": point})
    session = f"crash-{uuid.uuid4().hex[:6]}"
    reply, recovery_s = one_request_through_a_crash(pipeline, "processor", session, "survive the crash")
    outcome = Outcome("survive the crash", reply, time.monotonic())
    fault_summary(f"processor killed at {point}", [outcome], round(recovery_s, 2), pipeline.settings)
    assert pipeline.exit_codes["processor"] == -signal.SIGKILL  # the fault point fired
    assert reply.ok and reply.text == "survive the crash"
    assert len(history_of(pipeline, session)) == 2  # the user turn and the assistant turn, once each


def test_a_worker_killed_after_replying_and_before_committing_appends_its_turn_once(
    pipelines: Callable[..., Pipeline],
) -> None:
    """The redelivered request is generated again and its reply sent again: the
    caller sees one, the assistant turn is stored once, the repeat is counted."""
    pipeline = pipelines(roles=("monitor", "processor"))
    pipeline.start(("worker",), extra_env={"TIDEGATE_FAULTS": "worker.before_commit"})
    session = f"crash-{uuid.uuid4().hex[:6]}"
    reply, recovery_s = one_request_through_a_crash(pipeline, "worker", session, "answer me once")
    store = redis.Redis.from_url(pipeline.settings.redis_url)

    def repeats() -> int:
        keys = store.keys(f"{STATS_KEY}{pipeline.settings.topic_prefix}*")
        return sum(int(store.hget(k, "repeated_requests") or 0) for k in keys)

    wait_for(lambda: repeats() >= 1, 30, "the restarted worker to count its repeat")
    fault_summary(
        "worker killed before commit",
        [Outcome("answer me once", reply, time.monotonic())],
        round(recovery_s, 2),
        pipeline.settings,
        repeated_generations=repeats(),
    )
    assert pipeline.exit_codes["worker"] == -signal.SIGKILL
    assert reply.ok and reply.text == "answer me once"
    assert len(history_of(pipeline, session)) == 2
    assert repeats() == 1


def load_through(pipeline: Pipeline, tag: str, fault: Callable[[], None]) -> tuple[list[Outcome], float]:
    """LOAD_S of load at RATE_PER_S; `fault` runs a quarter of the way in."""
    return helpers.load_through(pipeline.settings, tag, fault, LOAD_S, RATE_PER_S)


# a member killed: the worker's case runs on Tansu too
@pytest.mark.parametrize("role", ["worker", pytest.param("processor", marks=pytest.mark.same_on_any_broker)])
def test_one_of_two_members_killed_under_load_loses_nothing(pipelines: Callable[..., Pipeline], role: str) -> None:
    pipeline = pipelines()
    pipeline.start((f"{role}-2",))

    def kill() -> None:
        os.killpg(pipeline.pids.pop(f"{role}-2"), signal.SIGKILL)

    outcomes, recovery_s = load_through(pipeline, f"kill-{role}", kill)
    figures = fault_summary(f"one of two {role}s SIGKILLed under load", outcomes, recovery_s, pipeline.settings)
    assert figures["lost"] == 0 and figures["duplicates_to_caller"] == 0


@pytest.mark.same_on_any_broker  # Redis away, the broker untouched
def test_redis_down_for_ten_seconds_under_load_loses_nothing(pipelines: Callable[..., Pipeline]) -> None:
    """Stages go on without history while Redis is away (`degraded`), and back to it after."""
    port = free_port()
    log_dir = LOG_DIR / f"redis-outage-{uuid.uuid4().hex[:6]}"
    server = devstack.start_redis(port, log_dir)
    try:
        pipeline = pipelines(redis_url=f"redis://127.0.0.1:{port}/0")
        restarted: list[int] = []

        def outage() -> None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            time.sleep(10.0)  # the outage itself: Redis is away this long
            restarted.append(devstack.start_redis(port, log_dir).pid)

        outcomes, recovery_s = load_through(pipeline, "redis-outage", outage)
        degraded = sum(1 for o in outcomes if o.reply is not None and o.reply.degraded)
        figures = fault_summary(
            "redis down 10 s under load", outcomes, recovery_s, pipeline.settings, degraded_replies=degraded
        )
        assert figures["lost"] == 0 and figures["duplicates_to_caller"] == 0
        after = asyncio.run(_one(pipeline, "after the outage"))
        assert after.ok and not after.degraded
    finally:
        for pid in restarted:
            stop_pid(pid)


async def _one(pipeline: Pipeline, text: str) -> Reply:
    async with Client(settings=pipeline.settings, reply_topic=pipeline.settings.topics.replies) as client:
        return await client.generate(user(text), f"one-{uuid.uuid4().hex[:6]}", max_new_tokens=8, deadline_s=60)


def watch_commits(pipeline: Pipeline, stage: Stage) -> tuple[list[tuple[int, int, int]], Callable[[], None]]:
    """Samples the stage group's committed offsets every 50 ms in a thread; the list
    collects (partition, before, after) for every move backwards; call the returned
    function to stop."""
    reader = LagReader(pipeline.settings, [stage])
    backwards: list[tuple[int, int, int]] = []
    watching = threading.Event()

    def watch() -> None:
        last: dict[int, int] = {}
        while not watching.is_set():
            try:
                now = reader.committed(stage)
            except Exception:  # the coordinator moving during a rebalance: ask again
                watching.wait(0.05)
                continue
            for partition, offset in now.items():
                if offset < last.get(partition, -1):
                    backwards.append((partition, last[partition], offset))
                last[partition] = max(offset, last.get(partition, -1))
            watching.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def stop() -> None:
        watching.set()
        watcher.join(5)
        reader.close()

    return backwards, stop


def test_a_worker_stopped_past_its_session_timeout_neither_commits_back_nor_doubles(
    pipelines: Callable[..., Pipeline],
) -> None:
    """SIGSTOP one of two workers for longer than its session timeout, then SIGCONT:
    the group moves its partitions to the other; the zombie's commits are refused,
    the workers' committed offsets never move backwards, and nothing is lost."""
    pipeline = pipelines()
    pipeline.start(("worker-2",))
    stage = next(s for s in pipeline_stages(pipeline.settings) if s.name == WORKERS)
    backwards, stop_watching = watch_commits(pipeline, stage)
    zombie = pipeline.pids["worker-2"]

    def stop_past_the_session() -> None:
        os.kill(zombie, signal.SIGSTOP)
        time.sleep(pipeline.settings.session_timeout_ms / 1000 + 3)  # the stop itself
        os.kill(zombie, signal.SIGCONT)

    try:
        outcomes, recovery_s = load_through(pipeline, "zombie", stop_past_the_session)
    finally:
        stop_watching()
    figures = fault_summary(
        "worker stopped past its session timeout",
        outcomes,
        recovery_s,
        pipeline.settings,
        commits_backwards=len(backwards),
    )
    assert figures["lost"] == 0 and figures["duplicates_to_caller"] == 0
    assert backwards == []


def test_three_workers_joining_and_leaving_under_load_never_commit_backwards(
    pipelines: Callable[..., Pipeline],
) -> None:
    """Workers 2 and 3 join, then leave (SIGTERM), while load flows: every request is
    answered, and the group's committed offsets only ever move forward."""
    pipeline = pipelines()
    stage = next(s for s in pipeline_stages(pipeline.settings) if s.name == WORKERS)
    backwards, stop_watching = watch_commits(pipeline, stage)

    def churn() -> None:
        pipeline.start(("worker-2",))
        pipeline.start(("worker-3",))
        pipeline.stop(("worker-2",))
        pipeline.stop(("worker-3",))

    try:
        outcomes, recovery_s = load_through(pipeline, "churn", churn)
    finally:
        stop_watching()
    figures = fault_summary(
        "workers 2 and 3 join and leave under load",
        outcomes,
        recovery_s,
        pipeline.settings,
        commits_backwards=len(backwards),
    )
    assert figures["lost"] == 0 and figures["duplicates_to_caller"] == 0
    assert backwards == []


@pytest.mark.same_on_any_broker  # the worker's own grace, then one commit
def test_sigterm_lets_a_worker_finish_and_commit_what_it_is_generating(pipelines: Callable[..., Pipeline]) -> None:
    """A worker told to stop while its batch generates (a simulated accelerator, 2 s a
    batch) replies to it, commits it and exits cleanly: nothing is redone."""
    pipeline = pipelines(model="sim:250")

    async def scenario() -> Reply:
        async with Client(settings=pipeline.settings, reply_topic=pipeline.settings.topics.replies) as client:
            request_id = await client.submit(user("finish me"), "graceful", max_new_tokens=8, deadline_s=60)
            stage = next(s for s in pipeline_stages(pipeline.settings) if s.name == WORKERS)
            reader = LagReader(pipeline.settings, [stage])
            try:  # the worker took it: fetched, so the batch is generating
                await asyncio.to_thread(
                    wait_for, lambda: reader.poll(0.05) or reader.lag(stage).log_end >= 1, 10, "the envelope"
                )
            finally:
                reader.close()
            await asyncio.sleep(0.5)  # inside the 2 s batch
            os.killpg(pipeline.pids["worker"], signal.SIGTERM)
            return await client.reply(request_id)

    reply = asyncio.run(scenario())
    code = pipeline.wait_exited("worker", 30)
    assert reply.ok and reply.text == "finish me"
    assert code == 0
    wait_for_stage_lag(pipeline.settings, WORKERS, 0, 10)  # committed before it left
