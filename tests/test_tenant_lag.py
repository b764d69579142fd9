"""The tenants' own request topics count in the processors' lag (issue 25, item 4).

With TENANT_TOPICS each tenant writes `<requests>.<tenant>`; the processors' backlog
there used to be invisible to their cap, `QueueFull`, the Burrow status, the alerts
and `tidegate lag`, which read the shared request topic alone.

A tenant's topic deleted while the processors drain the others: its committed
offsets left the stage's committed total, the drain rate measured as a difference of
totals fell to 0, and the seconds-cap to its floor (every tenant got `queue_full`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from ops.lag_report import lag_rows
from streams.kafka import admin_client, connection_config
from streams.lag import PROCESSORS, LagReader, pipeline_stages
from streams.pressure_feed import PressureListener
from tests.conftest import BROKER, Pipeline
from tests.helpers import wait_for

BACKLOG = 120
SHARED_BACKLOG = 16_000
COMMIT_STEP = 40  # records per 0.1 s on the shared topic: a drain rate of ~400/s
TENANT_DONE = 3000  # the tenant's records the group committed before its topic goes
FLOOR = 8 * 4  # PROCESSOR_BATCH 8 x FLOOR_BATCHES
WATCH_AFTER_S = 7.0  # past the spell (5 s of busy time) that holds the deletion


def create_tenant_topic(pipeline: Pipeline, tenant: str) -> str:
    """The tenant's request topic, as `tidegate tenant add` creates it (without its
    SCRAM user and ACLs: the test broker has no authentication)."""
    topic = pipeline.settings.topics.tenant_requests(tenant)
    new = NewTopic(topic, pipeline.settings.request_partitions, 1)
    admin = admin_client(pipeline.settings)  # kept until the futures resolve
    for future in admin.create_topics([new], operation_timeout=10).values():
        future.result(timeout=30)
    return topic


def test_a_tenants_backlog_raises_the_processors_pressure(pipeline_factory: Callable[..., Pipeline]) -> None:
    """A tenant added while the monitor runs, its records produced with nothing
    consuming them: the processors' published lag, health and `tidegate lag` count them."""
    pipeline = pipeline_factory(roles=("monitor",), tenant_topics=True, processors_cap_messages=100)
    listener = PressureListener(pipeline.settings)
    listener.start()
    try:
        wait_for(lambda: listener.board.state(PROCESSORS), 15, "the monitor's first state")
        topic = create_tenant_topic(pipeline, "acme")
        producer = Producer(connection_config(pipeline.settings))
        for i in range(BACKLOG):
            producer.produce(topic, b"{}", f"s{i % 13}".encode())
        assert producer.flush(30) == 0

        def counted() -> dict | None:
            state = listener.board.state(PROCESSORS) or {}
            return state if state.get("lag", 0) >= BACKLOG else None

        state = wait_for(counted, 30, f"the processors' lag to count the tenant's {BACKLOG} records")
        assert state["lag"] == BACKLOG and state["state"] == "full"  # over its cap of 100
        assert any(label.startswith("acme/") for label in state["partition_health"])
        assert state["partitions"] == 2 * pipeline.settings.request_partitions

        reader = LagReader(pipeline.settings, pipeline_stages(pipeline.settings))
        try:  # `tidegate lag`: on Tansu a fresh reader's log ends come from its own fetches
            # (Tansu's ListOffsets answers early), so a few reads may pass before they are all in

            def reported() -> dict | None:
                row = {r["stage"]: r for r in lag_rows(reader, listener)}[PROCESSORS]
                return row if row["lag"] >= BACKLOG else None

            row = wait_for(reported, 15, f"`tidegate lag` to count the tenant's {BACKLOG} records")
            assert row["lag"] == BACKLOG
            assert topic in row["topics"]
        finally:
            reader.close()

        if BROKER == "tansu":  # a deleted topic stayed in the lag there (its metadata, not looked into)
            return
        # the tenant leaves (its topic deleted): its backlog leaves the lag and the health
        admin = admin_client(pipeline.settings)
        for future in admin.delete_topics([topic], operation_timeout=10).values():
            future.result(timeout=30)

        def forgotten() -> dict | None:
            state = listener.board.state(PROCESSORS) or {}
            labels = state.get("partition_health", {})
            return state if state.get("lag") == 0 and not any(k.startswith("acme/") for k in labels) else None

        wait_for(forgotten, 30, "the deleted tenant topic to leave the processors' lag and health")
        assert os.waitpid(pipeline.pids["monitor"], os.WNOHANG) == (0, 0), "the monitor exited"
    finally:
        listener.close()


def tenant_labels(listener: PressureListener, tenant: str) -> list[str]:
    """The tenant's partitions in the processors' latest published health."""
    health = (listener.board.state(PROCESSORS) or {}).get("partition_health", {})
    return [label for label in health if label.startswith(f"{tenant}/")]


def delete_topic(pipeline: Pipeline, topic: str) -> None:
    admin = admin_client(pipeline.settings)  # kept until the futures resolve
    for future in admin.delete_topics([topic], operation_timeout=10).values():
        future.result(timeout=30)


@pytest.mark.skipif(BROKER == "tansu", reason="a deleted topic stays in Tansu's metadata")
def test_a_deleted_tenant_topic_keeps_the_processors_drain_rate_and_cap(
    pipeline_factory: Callable[..., Pipeline],
) -> None:
    """The group drains the shared topic at ~400/s (commits made here, a group with no
    live member) and has committed TENANT_DONE records on tenant acme's topic; the
    topic is deleted: its backlog and health leave the stage, its drain rate and
    seconds-cap stay what the stage keeps doing."""
    pipeline = pipeline_factory(roles=("monitor",), tenant_topics=True, processor_batch=8, processors_cap_seconds=2.0)
    settings = pipeline.settings
    shared = settings.topics.requests
    listener = PressureListener(settings)
    listener.start()
    committer = Consumer({**connection_config(settings), "group.id": settings.processor_group})
    done = threading.Event()

    def drain() -> None:
        offset = 0
        while not done.wait(0.1) and offset < SHARED_BACKLOG - 400:
            offset += COMMIT_STEP
            committer.commit(offsets=[TopicPartition(shared, 0, offset)], asynchronous=False)

    drainer = threading.Thread(target=drain, daemon=True)
    try:
        topic = create_tenant_topic(pipeline, "acme")
        producer = Producer(connection_config(settings))
        for _ in range(TENANT_DONE):
            producer.produce(topic, b"x", partition=0)
        for _ in range(SHARED_BACKLOG):
            producer.produce(shared, b"x", partition=0)
        assert producer.flush(30) == 0
        committer.commit(offsets=[TopicPartition(topic, 0, TENANT_DONE)], asynchronous=False)
        wait_for(
            lambda: any(
                k.startswith("acme/") for k in (listener.board.state(PROCESSORS) or {}).get("partition_health", {})
            ),
            30,
            "the tenant's topic in the processors' lag",
        )
        drainer.start()
        before = wait_for(
            lambda: (s := listener.board.state(PROCESSORS)) and s["drain_rate"] > 200 and s["cap"] > 4 * FLOOR and s,
            30,
            "a measured drain rate and a cap above the floor",
        )
        delete_topic(pipeline, topic)
        seen: list[dict] = []
        gone_at: list[float] = []

        def watched() -> bool:
            state = listener.board.state(PROCESSORS) or {}
            if state and (not seen or state["updated_ms"] > seen[-1]["updated_ms"]):
                seen.append(state)
            if not gone_at and state and not tenant_labels(listener, "acme"):
                gone_at.append(time.monotonic())
            return bool(gone_at) and time.monotonic() > gone_at[0] + WATCH_AFTER_S

        wait_for(watched, 40, f"the deleted topic gone from the lag, and {WATCH_AFTER_S} s more")
        assert not done.is_set() and drainer.is_alive(), "the drain ended before the watch: a longer backlog"
        lowest_rate = min(s["drain_rate"] for s in seen)
        lowest_cap = min(s["cap"] for s in seen)
        print(
            f"TENANT DELETED: before drain {before['drain_rate']}/s cap {before['cap']}; "
            f"after, over {len(seen)} states: lowest drain {lowest_rate}/s, lowest cap {lowest_cap}"
        )
        assert lowest_rate >= 0.5 * before["drain_rate"], "the drain rate fell when the tenant's topic went"
        assert lowest_cap > 2 * FLOOR, "the seconds-cap fell to its floor when the tenant's topic went"
        assert seen[-1]["lag"] > 0 and seen[-1]["partitions"] == settings.request_partitions
        assert os.waitpid(pipeline.pids["monitor"], os.WNOHANG) == (0, 0), "the monitor exited"
    finally:
        done.set()
        if drainer.is_alive():
            drainer.join(5)
        listener.close()
        committer.close()
