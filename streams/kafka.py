"""confluent-kafka configuration and topic creation, kept to the plain Kafka protocol."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka.admin import AdminClient, NewTopic

from streams.config import Settings
from streams.exceptions import TidegateError
from streams.fleet import load_fleet

log = logging.getLogger(__name__)


def connection_config(settings: Settings) -> dict[str, Any]:
    """How every confluent-kafka client of this process reaches the brokers: the
    bootstrap servers and, where configured, SASL and TLS. Every Consumer, Producer
    and AdminClient starts from this."""
    config: dict[str, Any] = {"bootstrap.servers": settings.bootstrap}
    if settings.security_protocol != "PLAINTEXT":
        config["security.protocol"] = settings.security_protocol
    if settings.security_protocol.startswith("SASL"):
        config["sasl.mechanisms"] = settings.sasl_mechanism
        config["sasl.username"] = settings.sasl_username or ""
        config["sasl.password"] = settings.sasl_password or ""
    if settings.ssl_ca_location:
        config["ssl.ca.location"] = settings.ssl_ca_location
    return config


def admin_client(settings: Settings, **overrides: Any) -> AdminClient:
    return AdminClient({**connection_config(settings), **overrides})


def check_reachable(bootstrap: str, timeout_s: float = 3.0) -> None:
    """Fails fast, in one line, when no bootstrap server accepts a connection
    (librdkafka would retry quietly, or loudly, until its own timeouts)."""
    errors = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError) as exc:
            errors.append(f"{server}: {exc}")
    raise TidegateError(
        f"no Kafka broker reachable at {bootstrap} ({'; '.join(errors)}); start one with `tidegate dev up`"
    )


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent, acks from every in-sync replica: a record the broker acknowledged
    survives the loss of a broker (topics have min.insync.replicas=2 on a cluster)."""
    return {
        **connection_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": settings.linger_ms,
        # a record for a topic the broker does not know fails after this long rather
        # than librdkafka's 30 s, a stall for the stage that waits on its delivery
        # (reply topics are checked before, streams/reply_topics.py)
        "topic.metadata.propagation.max.ms": 5000,
        **overrides,
    }


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Classic group protocol with short session timeouts (Tansu's group join waits
    about half the session timeout; on Apache Kafka they bound how long a dead
    member's partitions wait), starting from the earliest offset where the group has
    none: a request is never skipped (docs/design.md)."""
    return {
        **connection_config(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": settings.heartbeat_interval_ms,
        "partition.assignment.strategy": "roundrobin",
        "fetch.wait.max.ms": settings.fetch_wait_ms,
        **overrides,
    }


def consume_ready(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Waits up to `timeout_s` for one message, then takes whatever else is already
    fetched, up to `max_messages`. `consume(n, timeout)` itself waits until it has all
    n or the timeout ran out: a reply loop on `consume(500, 0.05)` handed each reply
    over up to 50 ms late, a pressure listener on `consume(100, 0.1)` each state up to
    100 ms late."""
    first = consumer.consume(1, timeout_s)
    return first + consumer.consume(max_messages - 1, 0) if first and max_messages > 1 else first


def topic_partitions(settings: Settings) -> dict[str, int]:
    """Every topic of the deployment and its partitions: each pool of the fleet has its
    own contexts topic (the `default` pool's is `<prefix>contexts`, kept even where the
    fleet file names no such pool: processors of an earlier version still write there).

    :raises FleetError: the fleet file is wrong (streams/fleet.py)."""
    t = settings.topics
    topics = {
        t.requests: settings.request_partitions,
        t.contexts: settings.context_partitions,
        t.replies: settings.reply_partitions,
        t.pressure: 1,
        t.dead_letter: 1,
        t.outcomes: 1,
    }
    for pool in load_fleet(settings).pools.values():
        topics[pool.contexts_topic] = pool.partitions
    return topics


# the pressure topic keeps the latest state per stage: segments roll every minute so
# the cleaner can compact them, and a reader starting at its beginning reads little
PRESSURE_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": "60000",
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": "60000",
}


def replication_factor(brokers: int) -> int:
    """Three copies where there are three brokers or more, else one per broker."""
    return max(1, min(3, brokers))


def create_topics(settings: Settings, timeout_s: float = 30.0) -> None:
    """Creates tidegate's topics where missing (every pool's contexts topic among them):
    replicated three ways with min.insync.replicas=2 on a cluster of three or more, the
    pressure topic compacted, the outcomes kept an hour.

    Retries until the broker answers, one log line per attempt.
    """
    admin = admin_client(settings)
    wanted = topic_partitions(settings)
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        try:
            metadata = admin.list_topics(timeout=5)
            existing = set(metadata.topics)
            break
        except KafkaException as exc:
            log.info("broker=%s attempt=%d not reachable: %s", settings.bootstrap, attempt, exc)
            if time.monotonic() > deadline:
                raise
    replicas = replication_factor(len(metadata.brokers))
    durability = {"min.insync.replicas": "2"} if replicas >= 3 else {}
    new = [
        NewTopic(
            name,
            num_partitions=n,
            replication_factor=replicas,
            config={**durability, **topic_config(settings, name)},
        )
        for name, n in wanted.items()
        if name not in existing
    ]
    if not new:
        return
    for name, future in admin.create_topics(new, operation_timeout=10).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        log.info("topic=%s replicas=%d created", name, replicas)


# the workers' outcomes are read from their end by the lag monitor as they come: an
# hour of them is plenty for an operator reading back (a record per worker a second)
OUTCOMES_TOPIC_CONFIG = {"retention.ms": str(3_600_000), "cleanup.policy": "delete"}


def topic_config(settings: Settings, name: str) -> dict[str, str]:
    """The configuration a topic of the deployment is created with, beyond durability."""
    if name == settings.topics.pressure:
        return PRESSURE_TOPIC_CONFIG
    if name == settings.topics.outcomes:
        return OUTCOMES_TOPIC_CONFIG
    return {}


# A client's own reply topic: one partition, its records kept an hour (a reply
# nobody read by then is for a caller that is gone). Never deleted by tidegate: a
# reply in flight to a deleted topic holds its producer until the message timeout.
CLIENT_REPLY_TOPIC_CONFIG = {"retention.ms": str(3_600_000), "cleanup.policy": "delete"}


def create_client_reply_topic(settings: Settings, name: str, timeout_s: float = 30.0) -> None:
    """Creates `name` (one partition) and returns once the broker lists it, so the
    processors' check of `reply_to` (streams/reply_topics.py) finds it."""
    admin = admin_client(settings)
    brokers = len(admin.list_topics(timeout=10).brokers)
    replicas = replication_factor(brokers)
    durability = {"min.insync.replicas": "2"} if replicas >= 3 else {}
    topic = NewTopic(
        name, num_partitions=1, replication_factor=replicas, config={**CLIENT_REPLY_TOPIC_CONFIG, **durability}
    )
    for future in admin.create_topics([topic], operation_timeout=10).values():
        future.result(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while name not in admin.list_topics(timeout=10).topics:
        if time.monotonic() > deadline:
            raise KafkaException(f"topic {name} created but not listed after {timeout_s:.0f}s")
        time.sleep(0.05)
