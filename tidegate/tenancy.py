"""Adding a tenant to a cluster with SASL/SCRAM and ACLs: who it is and what it may touch.

A tenant is a SCRAM user of its own name. It may write only its own request topic,
`<requests>.<tenant>` (the processors take the tenant from that topic's name, so a
record cannot claim another tenant), and create, read and delete only reply topics
under `<replies>.<tenant>.` (each client's own, streams/client.py); it may read the
pressure topic, to be told "queue full" before it sends. Nothing else: with
StandardAuthorizer and `allow.everyone.if.no.acl.found=false`, what no ACL allows is
refused. Run as a super user (the stages' principal).
"""

from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from streams.config import Settings
from streams.exceptions import TidegateError
from streams.kafka import admin_client, check_reachable, replication_factor
from streams.tenants import TENANT_NAME

SCRAM_ITERATIONS = 8192
# the throwaway group ids a client's assign-only consumers carry
CLIENT_GROUP_PREFIXES = ("tidegate-client-", "tidegate-pressure-")


def tenant_acls(settings: Settings, tenant: str) -> list[AclBinding]:
    """Everything `tenant`'s principal is allowed; the rest is refused."""
    topics = settings.topics
    principal = f"User:{tenant}"

    def allow(kind: ResourceType, name: str, pattern: ResourcePatternType, op: AclOperation) -> AclBinding:
        return AclBinding(kind, name, pattern, principal, "*", op, AclPermissionType.ALLOW)

    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    replies = topics.tenant_replies(tenant)
    return [
        allow(ResourceType.TOPIC, topics.tenant_requests(tenant), literal, AclOperation.WRITE),
        allow(ResourceType.TOPIC, topics.tenant_requests(tenant), literal, AclOperation.DESCRIBE),
        *(
            allow(ResourceType.TOPIC, replies, prefixed, op)
            for op in (AclOperation.CREATE, AclOperation.READ, AclOperation.DESCRIBE, AclOperation.DELETE)
        ),
        allow(ResourceType.TOPIC, topics.pressure, literal, AclOperation.READ),
        allow(ResourceType.TOPIC, topics.pressure, literal, AclOperation.DESCRIBE),
        *(allow(ResourceType.GROUP, group, prefixed, AclOperation.READ) for group in CLIENT_GROUP_PREFIXES),
    ]


def add_tenant(settings: Settings, tenant: str, password: str, timeout_s: float = 30.0) -> None:
    """Creates (or updates) `tenant`'s SCRAM credentials, its request topic and its ACLs."""
    if not TENANT_NAME.fullmatch(tenant):
        raise TidegateError(f"tenant {tenant[:80]!r} must be 1-64 letters, digits, '_' or '-'")
    check_reachable(settings.bootstrap)
    try:
        _add_tenant(settings, tenant, password, timeout_s)
    except KafkaException as exc:
        raise TidegateError(f"adding tenant {tenant!r}: {exc.args[0]}") from exc


def _add_tenant(settings: Settings, tenant: str, password: str, timeout_s: float) -> None:
    admin = admin_client(settings)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, SCRAM_ITERATIONS)
    for future in admin.alter_user_scram_credentials(
        [UserScramCredentialUpsertion(tenant, info, password.encode())]
    ).values():
        future.result(timeout=timeout_s)
    replicas = replication_factor(len(admin.list_topics(timeout=10).brokers))
    durability = {"min.insync.replicas": "2"} if replicas >= 3 else {}
    topic = NewTopic(settings.topics.tenant_requests(tenant), settings.request_partitions, replicas, config=durability)
    for future in admin.create_topics([topic], operation_timeout=10).values():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    for future in admin.create_acls(tenant_acls(settings, tenant)).values():
        future.result(timeout=timeout_s)
