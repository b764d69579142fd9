"""Tenants cannot see each other, on Apache Kafka with SASL/SCRAM and ACLs.

A cluster with StandardAuthorizer and nothing allowed without an ACL; the stages run
as its super user; two tenants, acme and globex, added by tidegate/tenancy.py. Each
tenant's client works end to end; and acme, crafting records by hand with its own
credentials, can neither write where globex's requests go, nor read globex's
replies, nor reach globex's history or reply topic through a request it writes
where it may.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import orjson
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from conversation.history import history_key
from schemas import get_codec
from streams import Client, Settings
from streams.kafka import admin_client, connection_config, create_topics
from tests.conftest import LOG_DIR, Pipeline
from tests.helpers import TopicReader
from tidegate.kafka_broker import Sasl, start_kafka
from tidegate.tenancy import add_tenant

pytestmark = [pytest.mark.integration, pytest.mark.kafka_only]

# without DESCRIBE the broker does not even say the topic exists
DENIED = {"TOPIC_AUTHORIZATION_FAILED", "_UNKNOWN_PARTITION", "UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_TOPIC"}
PASSWORDS = {"acme": uuid.uuid4().hex, "globex": uuid.uuid4().hex}


@pytest.fixture(scope="module")
def secured(services: tuple[str, str]) -> Iterator[tuple[Settings, dict[str, Settings]]]:
    """(the stages' settings, each tenant's settings) on a SASL cluster with ACLs,
    the processor and the worker running."""
    sasl = Sasl()
    tag = uuid.uuid4().hex[:6]
    cluster = start_kafka(1, LOG_DIR / f"kafka-sasl-{tag}", LOG_DIR / f"kafka-sasl-{tag}-logs", sasl=sasl)
    pipeline = None
    try:
        common = {
            "bootstrap": cluster.bootstrap,
            "redis_url": services[1],
            "security_protocol": "SASL_PLAINTEXT",
            "tenant_topics": True,
            "model": "echo",
            "topic_prefix": f"s{tag}.",
            "processor_group": f"processors-{tag}",
            "worker_group": f"workers-{tag}",
        }
        stages = Settings(**common, sasl_username=sasl.admin, sasl_password=sasl.password)  # type: ignore[arg-type]
        create_topics(stages)
        for tenant, password in PASSWORDS.items():
            add_tenant(stages, tenant, password)
        tenants = {
            tenant: Settings(**common, sasl_username=tenant, sasl_password=password)  # type: ignore[arg-type]
            for tenant, password in PASSWORDS.items()
        }
        pipeline = Pipeline(stages, LOG_DIR / f"isolation-{tag}")
        pipeline.start(("processor", "worker"))
        yield stages, tenants
    finally:
        if pipeline is not None:
            pipeline.stop()
        cluster.stop()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def produce(settings: Settings, topic: str, value: bytes) -> str | None:
    """Produces one JSON record with `settings`' credentials; the broker's error, if any."""
    producer = Producer({**connection_config(settings), "message.timeout.ms": 10_000})
    errors: list[str] = []
    producer.produce(
        topic,
        value,
        b"k",
        headers=[("content-type", b"application/json")],
        on_delivery=lambda err, _m: errors.append(err.name()) if err else None,
    )
    assert producer.flush(15) == 0
    return errors[0] if errors else None


def read_error(settings: Settings, topic: str) -> str | None:
    """The broker's answer when `settings`' principal reads `topic` (None: it may):
    its offsets (ListOffsets) and its records (Fetch) are both asked for."""
    consumer = Consumer({**connection_config(settings), "group.id": f"tidegate-client-{uuid.uuid4().hex}"})
    try:
        try:
            consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        except KafkaException as exc:
            return exc.args[0].name()
        consumer.assign([TopicPartition(topic, 0, 0)])
        for m in consumer.consume(10, 5):
            if m.error() is not None and m.error().code() != KafkaError._PARTITION_EOF:
                return m.error().name()
        return None
    finally:
        consumer.close()


def request(settings: Settings, request_id: str, **fields: object) -> bytes:
    return orjson.dumps(
        {
            "request_id": request_id,
            "session_id": f"s-{request_id}",
            "messages": user(f"hello {request_id}"),
            "max_new_tokens": 8,
            **fields,
        }
    )


def test_each_tenant_is_answered_through_its_own_topics(secured: tuple[Settings, dict[str, Settings]]) -> None:
    _, tenants = secured

    async def ask(tenant: str) -> tuple[str, str, int]:
        async with Client(settings=tenants[tenant], tenant=tenant) as client:
            reply = await client.generate(user(f"hi from {tenant}"), f"{tenant}-s", max_new_tokens=8)
            return reply.status, client.reply_topic, client.replies_read

    for tenant in PASSWORDS:
        status, reply_topic, read = asyncio.run(ask(tenant))
        assert status == "ok" and reply_topic.startswith(tenants[tenant].topics.tenant_replies(tenant))
        assert read == 1


def test_a_tenant_cannot_write_where_another_tenants_requests_go(secured: tuple[Settings, dict[str, Settings]]) -> None:
    _, tenants = secured
    acme = tenants["acme"]
    topics = acme.topics
    body = request(acme, f"x-{uuid.uuid4().hex[:6]}")
    assert produce(acme, topics.tenant_requests("globex"), body) == "TOPIC_AUTHORIZATION_FAILED"
    assert produce(acme, topics.requests, body) == "TOPIC_AUTHORIZATION_FAILED"  # the shared one: stages only
    assert produce(acme, topics.contexts, body) == "TOPIC_AUTHORIZATION_FAILED"  # nor a stage's input
    assert produce(acme, topics.tenant_requests("acme"), body) is None


def test_a_tenant_cannot_read_or_create_another_tenants_reply_topics(
    secured: tuple[Settings, dict[str, Settings]],
) -> None:
    _, tenants = secured
    acme, globex = tenants["acme"], tenants["globex"]

    async def globex_topic() -> str:
        async with Client(settings=globex, tenant="globex") as client:
            await client.generate(user("private"), "g-private", max_new_tokens=8)
            assert read_error(globex, client.reply_topic) is None  # its owner may: the name is right
            assert read_error(acme, client.reply_topic) in DENIED
            assert read_error(acme, acme.topics.contexts) in DENIED
            assert read_error(acme, acme.topics.replies) in DENIED
            return client.reply_topic

    asyncio.run(globex_topic())
    admin = admin_client(acme)
    futures = admin.create_topics([NewTopic(f"{acme.topics.tenant_replies('globex')}x", 1, 1)])
    with pytest.raises(Exception, match="TOPIC_AUTHORIZATION_FAILED"):
        next(iter(futures.values())).result(timeout=15)


def test_a_crafted_request_cannot_reach_another_tenants_history_or_replies(
    secured: tuple[Settings, dict[str, Settings]],
) -> None:
    """acme writes, where it may, a request that claims to be globex's, names globex's
    conversation and globex's reply topic: the processors take the tenant from the
    topic (acme), so globex's history is neither read nor written, and the request
    is dead-lettered (it names a reply topic that is not acme's), never answered to
    globex."""
    stages, tenants = secured
    acme, globex = tenants["acme"], tenants["globex"]
    store = redis.Redis.from_url(stages.redis_url)
    secret_session = f"g-secret-{uuid.uuid4().hex[:6]}"

    async def scenario() -> tuple[int, int, int]:
        async with Client(settings=globex, tenant="globex") as g, Client(settings=acme, tenant="acme") as a:
            await g.generate(user("my secret is 4812"), secret_session, max_new_tokens=8)
            before = store.llen(history_key("globex", secret_session))
            letters = TopicReader(stages, stages.topics.dead_letter)
            contexts = TopicReader(stages, stages.topics.contexts)
            forged = f"forged-{uuid.uuid4().hex[:6]}"
            stolen = f"stolen-{uuid.uuid4().hex[:6]}"
            # 1. globex's reply topic as reply_to: dead-lettered, nothing reaches globex
            body = request(acme, forged, tenant="globex", session_id=secret_session, reply_to=g.reply_topic)
            assert produce(acme, acme.topics.tenant_requests("acme"), body) is None
            # 2. its own reply topic, globex's tenant and session: processed as acme's
            body = request(acme, stolen, tenant="globex", session_id=secret_session, reply_to=a.reply_topic)
            assert produce(acme, acme.topics.tenant_requests("acme"), body) is None
            own = TopicReader(acme, a.reply_topic)  # the hand-made request's reply, read as acme
            answered = own.wait(lambda ms: any(m.key() == stolen.encode() for m in ms), 30, "the reply to acme")
            stolen_reply = orjson.loads(next(m for m in answered if m.key() == stolen.encode()).value())
            own.close()
            why = "not a reply topic of tenant 'acme'"
            letters.wait(
                lambda ms: any(why in dict(m.headers())["error"].decode() for m in ms),
                30,
                "the forged one's dead letter",
            )
            envelope = next(
                get_codec().decode(m.value())[1]
                for m in contexts.wait(lambda ms: any(stolen.encode() in m.value() for m in ms), 30, "the envelope")
                if stolen.encode() in m.value()
            )
            letters.close()
            contexts.close()
            assert stolen_reply["status"] == "ok"
            assert envelope["tenant"] == "acme"
            assert all("4812" not in t["content"] for t in envelope["turns"])
            after = store.llen(history_key("globex", secret_session))
            return before, after, g.replies_read

    before, after, globex_read = asyncio.run(scenario())
    assert before == after == 2  # globex's own question and answer, untouched
    assert globex_read == 1  # globex read its own reply, and nothing acme sent its way
