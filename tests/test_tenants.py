"""Tenants: quotas per minute with the exact retry time, and fair shares near the cap.

A tenants file gives one tenant quotas; its requests past them are answered
`rate_limited` with the time until one fits, and a waiting caller gets through once
that time has passed. Two tenants, one flooding three times the workers' capacity
and one sending a fifth of it: the light tenant's requests keep their share (nearly
all answered) while the flood's are refused `queue_full`.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from processors.quotas import QUOTAS_KEY, Quotas, quota_keys
from streams import Client, Reply
from streams.tenants import TenantPolicy, Tenants
from tests.conftest import Pipeline
from tests.helpers import offer_load

pytestmark = pytest.mark.integration


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_gcra_refuses_past_the_quota_with_the_exact_retry_time(services: tuple[str, str]) -> None:
    tenant = f"t{uuid.uuid4().hex[:6]}"
    tenants = Tenants(tenants={tenant: TenantPolicy(requests_per_minute=6, tokens_per_minute=100)})

    async def scenario() -> list:
        redis = Redis.from_url(services[1])
        try:
            quotas = Quotas(redis, tenants)
            first = await quotas.decide([(tenant, 10)] * 8 + [("unlisted", 5)])
            tokens = await Quotas(redis, tenants).decide([(f"{tenant}", 1)])  # requests bucket still over
            await redis.zrem(QUOTAS_KEY, *quota_keys(tenant))
            big = await quotas.decide([(tenant, 60), (tenant, 60)])  # tokens: 100 a minute
            return [first, tokens, big]
        finally:
            await redis.aclose()

    first, again, big = asyncio.run(scenario())
    assert [d.passed for d in first[:8]] == [True] * 6 + [False] * 2
    assert [d.requests_left for d in first[:6]] == [5, 4, 3, 2, 1, 0]
    # 6 a minute: one every 10 s; the 7th fits 10 s after the first (Redis's clock)
    assert all(9_900 <= d.retry_after_ms <= 10_000 for d in first[6:8]), first[6:8]
    assert first[8] is None  # no quota for a tenant not listed (the default is unlimited)
    assert not again[0].passed
    assert big[0].passed and not big[1].passed
    # 100 tokens a minute: 600 ms each; 120 asked, 20 over the minute's worth: 12 s
    assert 11_900 <= big[1].retry_after_ms <= 12_000, big[1]
    assert big[0].tokens_left == 40


@pytest.mark.same_on_any_broker  # quotas are Redis's
def test_a_tenant_past_its_quota_is_answered_rate_limited_and_a_waiting_caller_gets_through(
    pipeline_factory: Callable[..., Pipeline], tmp_path: Path
) -> None:
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_text("tenants:\n  metered:\n    requests_per_minute: 30\n")
    pipeline = pipeline_factory(("processor", "worker"), model="echo", tenants_file=str(tenants_file))
    settings = pipeline.settings

    async def scenario() -> tuple[list[Reply], list[Reply], Reply, float]:
        async with Client(settings=settings, tenant="metered") as metered, Client(settings=settings) as free:
            tag = uuid.uuid4().hex[:6]
            limited = [await metered.generate(user(f"m {i}"), f"m-{tag}-{i}", max_new_tokens=4) for i in range(32)]
            unlimited = [await free.generate(user(f"f {i}"), f"f-{tag}-{i}", max_new_tokens=4) for i in range(32)]
            started = time.monotonic()
            waited = await metered.generate(user("patient"), f"m-{tag}-p", max_new_tokens=4, wait=True, deadline_s=30)
            return limited, unlimited, waited, time.monotonic() - started

    limited, unlimited, waited, waited_s = asyncio.run(scenario())
    statuses = collections.Counter(r.status for r in limited)
    assert statuses["ok"] == 30 and statuses["rate_limited"] == 2, statuses
    refused = [r for r in limited if r.status == "rate_limited"]
    assert all(0 < (r.retry_after_ms or 0) <= 4_000 and "quota" in (r.error or "") for r in refused), refused
    assert all(r.status == "ok" for r in unlimited)  # another tenant is not held back
    assert waited.status == "ok" and waited_s < 10, (waited, waited_s)


ONE_WORKER_RPS = 40.0  # sim:50, batches of 16 one-turn prompts of 8 new tokens: 16 / 0.4 s


@pytest.mark.kafka_only  # load on two cores: Tansu's own CPU makes its figures another test
@pytest.mark.serial
@pytest.mark.timeout(240)
def test_a_flooding_tenant_cannot_take_the_light_tenants_share(pipeline_factory: Callable[..., Pipeline]) -> None:
    pipeline = pipeline_factory(model="sim:50")
    loose = pipeline.settings.model_copy(update={"backpressure": False})  # the processors decide

    async def scenario() -> tuple[list, list]:
        async with (
            Client(settings=loose, tenant="flood", reply_grace_s=60) as flood,
            Client(settings=loose, tenant="light", reply_grace_s=60) as light,
        ):
            heavy = asyncio.create_task(offer_load(flood, "flood", 25.0, 3 * ONE_WORKER_RPS, sessions=0))
            await asyncio.sleep(5)  # the flood has pushed the workers past their warn line
            calm = await offer_load(light, "light", 15.0, ONE_WORKER_RPS / 5, sessions=0)
            return await heavy, calm

    heavy, calm = asyncio.run(scenario())
    flood = collections.Counter(o.reply.status if o.reply else "lost" for o in heavy)
    light = collections.Counter(o.reply.status if o.reply else "lost" for o in calm)
    print(f"FAIRNESS flood {dict(flood)}, light {dict(light)}")
    assert flood["lost"] == 0 and light["lost"] == 0
    assert flood["queue_full"] > flood["ok"] / 2  # the flood was refused a good part
    # the light tenant asks for a tenth of the admissions and gets (nearly) all it asks
    assert light["ok"] >= 0.95 * sum(light.values()), light
