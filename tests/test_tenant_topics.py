"""A tenant added while the processors run is served without a restart (issue 25,
item 4, the processors' side: processors/tenant_topics.py).

With TENANT_TOPICS the processors used to list the tenants' request topics once,
at start: a tenant's topic created later was never read, and its requests were
never answered until the processors restarted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from confluent_kafka.admin import NewTopic

from streams.client import Client
from streams.kafka import admin_client
from tests.conftest import Pipeline


def create_tenant_topic(pipeline: Pipeline, tenant: str) -> str:
    """The tenant's request topic, as `tidegate tenant add` creates it (without its
    SCRAM user and ACLs: the test broker has no authentication)."""
    topic = pipeline.settings.topics.tenant_requests(tenant)
    admin = admin_client(pipeline.settings)  # kept until the futures resolve
    new = NewTopic(topic, pipeline.settings.request_partitions, 1)
    for future in admin.create_topics([new], operation_timeout=10).values():
        future.result(timeout=30)
    return topic


def test_a_tenant_added_while_the_processors_run_is_served(pipeline_factory: Callable[..., Pipeline]) -> None:
    pipeline = pipeline_factory(("processor", "worker"), model="echo", tenant_topics=True, tenant_topics_refresh_s=1.0)
    create_tenant_topic(pipeline, "newco")  # the processor is running: it listed no tenant at start

    async def ask(tenant: str) -> str:
        async with Client(settings=pipeline.settings, tenant=tenant) as client:
            reply = await client.generate([{"role": "user", "content": f"hello from {tenant}"}], "s", deadline_s=60)
            return reply.status

    assert asyncio.run(ask("newco")) == "ok"
