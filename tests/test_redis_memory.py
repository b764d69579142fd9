"""Redis past `maxmemory` under gateway traffic (issue 25, item 5): quotas still refuse
exactly and claims still dedupe, and one-shot (gateway) sessions keep no history.

A redis-server of its own (8 MB, the dev stack's eviction policy, a free loopback
port) takes what the stages write for each HTTP call, through the same scripts:
the processors' history read and claim, the worker's answer and response-cache
entry, the gateway's cancel keys, plus a few conversations that do keep history.
Before: every call's prompt and answer were kept a day; once Redis was full,
volatile-ttl evicted the shortest-lived keys first, the quota buckets (a spent
quota started full again), and the oldest claims (a redelivered request was
forwarded, and its turns appended, again)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from conversation.history import CANCEL_TTL_S, HistoryWriter, cancel_key, loaded_history, one_shot_session
from conversation.response_cache import CachedReply, cache_key, store
from processors.quotas import Quotas
from streams.tenants import TenantPolicy, Tenants
from tests.conftest import LOG_DIR
from tidegate import devstack
from tidegate.processes import free_port, stop_pid

pytestmark = pytest.mark.same_on_any_broker

MAXMEMORY = "8mb"
CALLS = 16_000  # about 30 MB of prompts, answers and cache entries
BATCH = 200
PROMPT = 600  # characters
ANSWER = 400


@pytest.fixture
def small_redis() -> Iterator[redis.Redis]:
    port = free_port()
    proc = devstack.start_redis(port, LOG_DIR, maxmemory=MAXMEMORY)
    client = redis.Redis(port=port)
    try:
        yield client
    finally:
        client.close()
        stop_pid(proc.pid)


def text(n: int) -> str:
    return (uuid.uuid4().hex * (n // 32 + 1))[:n]


def serve(r: redis.Redis, writer: HistoryWriter, calls: list[tuple[str, str, str]]) -> list[bool]:
    """One batch of calls (tenant, session, request id) through the stages' Redis steps;
    which were fresh (not claimed before)."""
    with r.pipeline(transaction=False) as pipe:
        for tenant, session, rid in calls:
            writer.load(pipe, rid, tenant, session, 300)
        fresh = [loaded_history(reply) is not None for reply in pipe.execute()]
    with r.pipeline(transaction=False) as pipe:
        for tenant, session, rid in calls:
            writer.claim_append(pipe, rid, tenant, session, [{"role": "user", "content": text(PROMPT), "tokens": 150}])
        pipe.execute()
    with r.pipeline(transaction=False) as pipe:
        for tenant, session, rid in calls:
            answer = {"role": "assistant", "content": text(ANSWER), "tokens": 100}
            writer.append_once(pipe, rid, tenant, session, [answer])
        pipe.execute()
    entries = [
        (cache_key("m", [{"role": "user", "content": rid}], 64, tenant), CachedReply(text(ANSWER), 150, 100))
        for tenant, _, rid in calls
    ]
    store(r, entries, 3600)
    for tenant, _, rid in calls[::10]:  # a tenth of the callers hang up
        r.set(cancel_key(tenant, rid), 1, ex=CANCEL_TTL_S)
    return fresh


def calls_of(start: int, n: int) -> list[tuple[str, str, str]]:
    """Gateway calls (a one-shot session each), one in ten a turn of a conversation."""
    found = []
    for i in range(start, start + n):
        tenant = f"tenant-{i % 7}"
        session = f"conv-{i % 300}" if i % 10 == 0 else one_shot_session(f"http-{i}")
        found.append((tenant, session, f"req-{i}"))
    return found


def test_past_maxmemory_quotas_refuse_exactly_and_claims_dedupe(small_redis: redis.Redis) -> None:
    r = small_redis
    writer = HistoryWriter(86_400, 400)
    metered = Tenants(tenants={"metered": TenantPolicy(requests_per_minute=1)})
    port = r.connection_pool.connection_kwargs["port"]

    async def decide() -> tuple[bool, int, float]:
        client = AsyncRedis(port=port)
        try:
            decision = (await Quotas(client, metered).decide([("metered", 1)]))[0]
            assert decision is not None
            return decision.passed, decision.retry_after_ms, time.monotonic()
        finally:
            await client.aclose()

    passed, _, spent_at = asyncio.run(decide())
    assert passed  # the minute's one request
    first = calls_of(0, BATCH)
    assert all(serve(r, writer, first))
    for start in range(BATCH, CALLS, BATCH):
        serve(r, writer, calls_of(start, BATCH))
    info = r.info()
    print(
        f"REDIS after {CALLS} calls: used {info['used_memory'] / 2**20:.1f} MB of {MAXMEMORY}, "
        f"{info['evicted_keys']} keys evicted, {r.dbsize()} keys, {r.zcard('tidegate:claims')} claims"
    )
    assert info["evicted_keys"] > 0, "Redis never reached maxmemory: the test proves nothing"

    # the quota is still spent: refused, and told the exact wait (GCRA: a minute after the pass)
    passed, retry_ms, asked_at = asyncio.run(decide())
    assert not passed
    expected = 60_000 - (asked_at - spent_at) * 1000
    assert abs(retry_ms - expected) < 1000, (retry_ms, expected)

    # the first batch's claims still hold: redelivered, each is recognised, nothing appended
    assert serve(r, writer, first) == [False] * BATCH
    # the first batch's answered marks still hold: a redelivered generation (a worker
    # that died past its reply) appends nothing (before: marks with a TTL, evicted first)
    with r.pipeline(transaction=False) as pipe:
        for tenant, session, rid in first:
            writer.append_once(pipe, rid, tenant, session, [{"role": "assistant", "content": "again", "tokens": 1}])
        assert pipe.execute() == [0] * BATCH
    # and a one-shot call kept no history
    assert not list(r.scan_iter(match="tidegate:history:v2:*once%3A*", count=1000))


def test_a_tenant_past_its_sessions_bound_loses_its_oldest_not_another_tenants(small_redis: redis.Redis) -> None:
    """TENANT_MAX_SESSIONS 10: a tenant answered in 50 sessions keeps the history of
    10, and another tenant's 3 conversations are untouched."""
    r = small_redis
    writer = HistoryWriter(86_400, 400, max_sessions=10)

    def converse(tenant: str, session: str) -> None:
        rid = uuid.uuid4().hex
        with r.pipeline(transaction=False) as pipe:
            writer.claim_append(pipe, rid, tenant, session, [{"role": "user", "content": "hi", "tokens": 1}])
            writer.append_once(pipe, rid, tenant, session, [{"role": "assistant", "content": "hello", "tokens": 1}])
            writer.bound_sessions(pipe, tenant, session)
            pipe.execute()

    for i in range(3):
        converse("small", f"s{i}")
    for i in range(50):
        converse("big", f"s{i}")

    def histories(tenant: str) -> int:
        return len(list(r.scan_iter(match=f"tidegate:history:v2:{tenant}:*", count=1000)))

    assert histories("big") == 10
    assert histories("small") == 3
