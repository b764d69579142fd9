"""What the claims, answered marks and sessions index promise, against a real
redis-server (the review of the claims' move to `tidegate:claims`, issue 25 item 5):

- an answer that comes more than a claim's lapse after its claim still follows its
  question (it was parked under `early:` for a claim that had already run);
- during a rolling upgrade the old layout (`seen:`, `answered:`, string quota
  buckets) is still read, so nothing is parked, forwarded or appended twice;
- a tenant's sessions bound drops at most 64 sessions a call (an unpack of 9,000
  exceeded Lua's stack), and one command's error in the worker's pipeline costs
  only that command (the whole store was marked down for a second);
- sessions whose requests never got an answer count toward the bound;
- past maxmemory with nothing evictable left, the worker's refused writes are
  counted and logged, once per interval."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from conversation.history import (
    CLAIM_TTL_S,
    CLAIMS_KEY,
    HistoryWriter,
    cancel_key,
    claim_member,
    history_key,
    loaded_history,
    sessions_key,
)
from inference.jobs import Job
from inference.runners import EchoRunner, Generation
from inference.session_store import SessionStore
from processors.quotas import Quotas
from streams import metrics
from streams.config import Settings
from tests.conftest import LOG_DIR
from tidegate import devstack
from tidegate.processes import free_port, stop_pid

pytestmark = pytest.mark.same_on_any_broker

USER = {"role": "user", "content": "question", "tokens": 3}


@pytest.fixture
def redis_port() -> Iterator[int]:
    port = free_port()
    proc = devstack.start_redis(port, LOG_DIR, maxmemory="8mb")
    try:
        yield port
    finally:
        stop_pid(proc.pid)


@pytest.fixture
def r(redis_port: int) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_port)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def runner() -> EchoRunner:
    return EchoRunner()


def store_of(port: int, runner: EchoRunner, **settings: Any) -> SessionStore:
    return SessionStore(Settings(redis_url=f"redis://127.0.0.1:{port}/0", **settings), runner)


def job(tenant: str, session: str, request_id: str | None = None, forwarded_ms: int | None = None) -> Job:
    envelope = {
        "request_id": request_id or uuid.uuid4().hex,
        "tenant": tenant,
        "session_id": session,
        "forwarded_ms": int(time.time() * 1000) if forwarded_ms is None else forwarded_ms,
        "deadline_ms": 0,
    }
    return Job(record=None, envelope=envelope)  # type: ignore[arg-type]  # the record is not read here


def answer(store: SessionStore, *jobs: Job) -> None:
    store.append_turns(list(jobs), [Generation(f"answer {j.envelope['request_id']}", 3, 2) for j in jobs])  # type: ignore[index]


def claim(r: redis.Redis, writer: HistoryWriter, tenant: str, session: str, request_id: str) -> int:
    with r.pipeline(transaction=False) as pipe:
        writer.claim_append(pipe, request_id, tenant, session, [USER])
        return int(pipe.execute()[0])


def roles(r: redis.Redis, tenant: str, session: str) -> list[str]:
    entries = r.lrange(history_key(tenant, session), 0, -1)
    return ["assistant" if b"assistant" in entry else "user" for entry in entries]


def redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


# -- 1. an answer later than the claim's lapse ---------------------------------------


def test_an_answer_later_than_its_claims_lapse_follows_its_question(
    redis_port: int, r: redis.Redis, runner: EchoRunner
) -> None:
    """A request with no deadline waited over an hour on the contexts topic: its claim
    ran when it was forwarded and has lapsed (and been pruned) when the worker
    answers. Before: the answer was parked under `early:` for a claim that would
    never come again, and the history lost it."""
    writer = HistoryWriter(86_400, 400)
    rid = uuid.uuid4().hex
    assert claim(r, writer, "acme", "conv", rid) == 1
    r.zrem(CLAIMS_KEY, claim_member("acme", rid))  # lapsed an hour later, and pruned
    forwarded = redis_ms(r) - (CLAIM_TTL_S + 60) * 1000
    answer(store_of(redis_port, runner), job("acme", "conv", rid, forwarded_ms=forwarded))
    assert roles(r, "acme", "conv") == ["user", "assistant"]
    assert not r.keys("tidegate:early:*")


def test_an_answer_before_its_claim_still_waits_for_it(redis_port: int, r: redis.Redis, runner: EchoRunner) -> None:
    """The other side of the same check: a fresh envelope not claimed yet parks its
    answer, and the claim appends question, then answer."""
    writer = HistoryWriter(86_400, 400)
    rid = uuid.uuid4().hex
    answer(store_of(redis_port, runner), job("acme", "conv", rid))
    assert roles(r, "acme", "conv") == []
    assert claim(r, writer, "acme", "conv", rid) == 1
    assert roles(r, "acme", "conv") == ["user", "assistant"]


def test_a_claim_whose_append_fails_loses_no_parked_answer_and_claims_nothing(
    redis_port: int, r: redis.Redis, runner: EchoRunner
) -> None:
    """The session's history key changed type between the read and the claim: the
    claim's append fails. Before, the script had marked the claim and deleted the
    parked answer first (Lua keeps the writes before an error): the answer was lost,
    and the claim held, so a redelivery could not put the question back either."""
    writer = HistoryWriter(86_400, 400)
    rid = uuid.uuid4().hex
    answer(store_of(redis_port, runner), job("acme", "conv", rid))
    assert r.keys(f"tidegate:early:acme:*{rid}*") or r.keys("tidegate:early:acme:*")
    r.set(history_key("acme", "conv"), "not a list")
    with pytest.raises(redis.ResponseError):
        claim(r, writer, "acme", "conv", rid)
    assert r.keys("tidegate:early:acme:*"), "the parked answer was lost"
    assert r.zscore(CLAIMS_KEY, claim_member("acme", rid)) is None, "claimed with nothing appended"
    r.delete(history_key("acme", "conv"))  # mended: the redelivered request claims and appends both
    assert claim(r, writer, "acme", "conv", rid) == 1
    assert roles(r, "acme", "conv") == ["user", "assistant"]


# -- 2. a rolling upgrade: the old layout is read ------------------------------------


def test_a_claim_in_the_old_layout_is_recognised(redis_port: int, r: redis.Redis, runner: EchoRunner) -> None:
    """An old processor claimed the request (`seen:`, SET NX EX): a new processor's
    read, claim and lookup see it, and a new worker appends the answer, not parks it."""
    writer = HistoryWriter(86_400, 400)
    rid = uuid.uuid4().hex
    r.rpush(history_key("acme", "conv"), b"3\told question")  # the old processor's turns
    r.set(f"tidegate:seen:acme:{rid}", "1", ex=86_400)
    with r.pipeline(transaction=False) as pipe:
        writer.load(pipe, rid, "acme", "conv", None)
        writer.lookup_claims(pipe, [("acme", rid)])
        loaded, held = pipe.execute()
    assert loaded_history(loaded) is None
    assert held == [1]
    assert claim(r, writer, "acme", "conv", rid) == 0
    answer(store_of(redis_port, runner), job("acme", "conv", rid))
    assert roles(r, "acme", "conv") == ["user", "assistant"]
    assert not r.keys("tidegate:early:*")


def test_an_answered_mark_in_the_old_layout_is_recognised(redis_port: int, r: redis.Redis, runner: EchoRunner) -> None:
    writer = HistoryWriter(86_400, 400)
    rid = uuid.uuid4().hex
    assert claim(r, writer, "acme", "conv", rid) == 1
    r.set(f"tidegate:answered:acme:{rid}", "1", ex=86_400)  # an old worker answered it
    store = store_of(redis_port, runner)
    answer(store, job("acme", "conv", rid))
    assert roles(r, "acme", "conv") == ["user"]
    assert store.repeats == 1


def test_a_quota_spent_in_the_old_layout_still_refuses(r: redis.Redis, redis_port: int) -> None:
    """An old processor's string bucket (its TAT a minute ahead: the minute's request
    spent) is read by the new script."""
    from streams.tenants import TenantPolicy, Tenants

    tenants = Tenants(tenants={"metered": TenantPolicy(requests_per_minute=1)})
    r.set("tidegate:quota:req:metered", redis_ms(r) + 60_000, px=61_000)

    async def decide() -> bool:
        client = AsyncRedis(port=redis_port)
        try:
            decision = (await Quotas(client, tenants).decide([("metered", 1)]))[0]
            assert decision is not None
            return decision.passed
        finally:
            await client.aclose()

    assert not asyncio.run(decide())


def test_past_maxmemory_with_nothing_evictable_quotas_still_decide_exactly(r: redis.Redis, redis_port: int) -> None:
    """Redis refusing writes (OOM, nothing volatile left): the quota script still runs
    (it may: `allow-oom`, its memory is two members per tenant), so a spent quota still
    refuses and an unspent one passes. Before, the script's write failed, `decide`
    raised, and the processors went on without quotas (and without history) for a
    second at every batch."""
    from streams.tenants import TenantPolicy, Tenants

    tenants = Tenants(tenants={"metered": TenantPolicy(requests_per_minute=1)})
    for i in range(40):
        r.set(f"fill:{i}", b"x" * 50_000)  # no TTL: nothing volatile-lru may take
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 1_000_000)
    with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
        r.set("probe", b"x")

    async def decide() -> list[bool]:
        client = AsyncRedis(port=redis_port)
        try:
            quotas = Quotas(client, tenants)
            return [d.passed for d in await quotas.decide([("metered", 1), ("metered", 1)]) if d is not None]
        finally:
            await client.aclose()

    assert asyncio.run(decide()) == [True, False]


def test_a_redis_that_cannot_parse_the_quota_scripts_shebang_still_gets_quotas(r: redis.Redis, redis_port: int) -> None:
    """Redis before 7 cannot compile `#!lua flags=...`: before, `decide` raised and the
    processors went degraded (no claims, no history, no quotas) after every batch with
    a limited tenant. The quota script is then run without its shebang. (Redis 7 stands
    in for 6 here with a flag it does not know: the same refusal of the shebang.)"""
    from processors import quotas as quotas_module
    from streams.tenants import TenantPolicy, Tenants

    tenants = Tenants(tenants={"metered": TenantPolicy(requests_per_minute=1)})

    async def decide() -> list[bool]:
        client = AsyncRedis(port=redis_port)
        try:
            quotas = quotas_module.Quotas(client, tenants)
            quotas._script = client.register_script("#!lua flags=no-such-flag\n" + quotas_module._GCRA_PLAIN)
            return [d.passed for d in await quotas.decide([("metered", 1), ("metered", 1)]) if d is not None]
        finally:
            await client.aclose()

    assert asyncio.run(decide()) == [True, False]


# -- 3. the sessions bound, and one command's error ----------------------------------


def test_a_bound_far_below_a_tenants_sessions_drops_64_a_call(r: redis.Redis) -> None:
    """9,000 sessions over the bound (TENANT_MAX_SESSIONS lowered): before, the
    script's unpack failed with "too many results to unpack" on every answer."""
    index = sessions_key("big")
    now = redis_ms(r)
    r.zadd(index, {f"s{i}": now - 10_000 + i for i in range(9_100)})
    writer = HistoryWriter(86_400, 400, max_sessions=100)
    with r.pipeline(transaction=False) as pipe:
        writer.bound_sessions(pipe, "big", "new")
        dropped = pipe.execute()[0]
    assert dropped == 64
    assert r.zcard(index) == 9_101 - 64
    assert r.zscore(index, "new") is not None


def test_one_tenants_failing_command_does_not_take_redis_away_from_the_others(
    redis_port: int, r: redis.Redis, runner: EchoRunner
) -> None:
    """Tenant `broken`'s sessions index is not a sorted set: its bound fails. Before,
    the pipeline raised and the store left Redis alone for a second: every other
    tenant's turns, cancellations and cache were skipped."""
    r.set(sessions_key("broken"), "not a sorted set")
    store = store_of(redis_port, runner, tenant_max_sessions=10)
    other = job("other", "conv")
    r.set(cancel_key("other", other.envelope["request_id"]), 1)  # type: ignore[index]
    answer(store, job("broken", "conv"), job("other", "conv2"))
    assert roles(r, "other", "conv2") == []  # not claimed yet: parked, as it should be
    assert r.keys("tidegate:early:other:*")
    assert store.cancelled([other]) == [True]


# -- 4. sessions never answered count toward the bound -------------------------------


def test_sessions_whose_requests_were_never_answered_count_toward_the_bound(
    redis_port: int, r: redis.Redis, runner: EchoRunner
) -> None:
    """50 requests forwarded (their user turns written) that all ended expired,
    cancelled or in error, then one answer: the tenant keeps 10 histories."""
    processors = HistoryWriter(86_400, 400, max_sessions=10)  # as the processors build it (TENANT_MAX_SESSIONS)
    for i in range(50):
        claim(r, processors, "big", f"s{i}", uuid.uuid4().hex)
    rid = uuid.uuid4().hex
    claim(r, processors, "big", "answered", rid)
    answer(store_of(redis_port, runner, tenant_max_sessions=10), job("big", "answered", rid))
    kept = list(r.scan_iter(match="tidegate:history:v2:big:*", count=1000))
    assert len(kept) == 10
    assert history_key("big", "answered").encode() in kept


def test_a_claim_that_knows_the_bound_enforces_it(r: redis.Redis) -> None:
    bounded = HistoryWriter(86_400, 400, max_sessions=10)
    for i in range(50):
        claim(r, bounded, "big", f"s{i}", uuid.uuid4().hex)
    assert len(list(r.scan_iter(match="tidegate:history:v2:big:*", count=1000))) == 10
    assert r.exists(history_key("big", "s49"))


def test_a_one_shot_session_stays_out_of_the_index(r: redis.Redis) -> None:
    claim(r, HistoryWriter(86_400, 400, max_sessions=10), "acme", "once:abc", uuid.uuid4().hex)
    assert not r.exists(sessions_key("acme"))


def test_without_a_bound_no_sessions_index_is_kept(r: redis.Redis) -> None:
    """TENANT_MAX_SESSIONS=0: nothing to bound, so no index grows (before: every
    session written was added to it)."""
    claim(r, HistoryWriter(86_400, 400, max_sessions=0), "acme", "conv", uuid.uuid4().hex)
    assert r.exists(history_key("acme", "conv"))
    assert not r.exists(sessions_key("acme"))


# -- 6. past maxmemory with nothing evictable ----------------------------------------


def refused_writes() -> float:
    return metrics.REDIS_WRITE_REFUSALS.labels("workers")._value.get()


def test_writes_refused_past_maxmemory_are_counted_and_logged_once(
    redis_port: int, r: redis.Redis, runner: EchoRunner, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing volatile left to evict: Redis refuses every write (OOM). The worker's
    answers are counted as refused writes and logged once per interval, not as
    "Redis unreachable", and its reads (cancellations) go on."""
    for i in range(40):
        r.set(f"fill:{i}", b"x" * 50_000)  # no TTL: nothing volatile-lru may take
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 1_000_000)
    store = store_of(redis_port, runner)
    before = refused_writes()
    caplog.set_level(logging.WARNING, logger="inference.session_store")
    answer(store, job("acme", "conv"), job("acme", "conv2"))
    answer(store, job("acme", "conv"))
    assert refused_writes() - before == 6  # per answer, its turn and its session's bound
    lines = [rec.getMessage() for rec in caplog.records if "refuses writes" in rec.getMessage()]
    assert len(lines) == 1, lines
    assert "maxmemory" in lines[0]
    cancelled = job("acme", "conv")
    assert store.cancelled([cancelled]) == [False]
    assert store._available()
    # a refused response-cache entry is the same: counted, and Redis stays in use
    cached = job("acme", "conv")
    cached.cache_key = "tidegate:cache:test"
    store.remember([cached], [Generation("text", 1, 1)])
    assert refused_writes() - before == 7
    assert store._available()
