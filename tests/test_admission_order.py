"""Quotas are charged only for admitted work (processors/admission.py), with the
handler on a real Redis: a caller refused `queue_full` keeps its tenant's quota, a
redelivered duplicate spends none, and a request its quota refuses is taken back
from the pressure board's count."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from conversation.tokens import TokenCounter
from processors.app import downstream_admission
from processors.fairness import FairShares
from processors.handler import Incoming, RequestHandler
from schemas import get_codec
from streams.config import Settings
from streams.outgoing import Outgoing
from streams.pressure import FULL, OK, PressureBoard
from streams.tenants import TenantPolicy, Tenants
from tests.handler_support import delivered, pressure, request_record

pytestmark = pytest.mark.same_on_any_broker  # Redis and the handler: nothing a broker does


def record(tenant: str) -> Incoming:
    return request_record(uuid.uuid4().hex[:8], tenant=tenant)


def outcomes(out: list[Outgoing]) -> list[str]:
    """`envelope`, or the reply's status, per output."""
    codec = get_codec()
    return [
        "envelope" if o.topic.endswith("contexts") else codec.decode(o.value, "InferenceReply")[1]["status"]
        for o in out
    ]


def handle(runner: asyncio.Runner, handler: RequestHandler, records: list[Incoming]) -> list[str]:
    return outcomes(delivered(runner, handler, records))


def make_handler(
    redis_url: str, counter: TokenCounter, tenant: str, per_minute: int, board: PressureBoard | None = None
) -> RequestHandler:
    settings = Settings(redis_url=redis_url, fair_shares=False)
    tenants = Tenants(tenants={tenant: TenantPolicy(requests_per_minute=per_minute)})
    admission, release = downstream_admission(board) if board is not None else (None, None)
    redis = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    return RequestHandler(settings, redis, counter, admission, None, None, tenants, release)


def test_a_tenant_refused_queue_full_keeps_its_quota(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    board = PressureBoard(stale_s=30, warn_ratio=0.8)
    board.publish(pressure(FULL, 500, 100))
    handler = make_handler(services[1], counter, tenant, per_minute=5, board=board)
    for _ in range(4):  # 20 refusals: a caller retrying at its retry times
        assert handle(runner, handler, [record(tenant) for _ in range(5)]) == ["queue_full"] * 5
    board.publish(pressure(OK, 0, 100))
    assert handle(runner, handler, [record(tenant) for _ in range(6)]) == ["rate_limited"] + ["envelope"] * 5


def test_a_redelivered_duplicate_spends_no_quota(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    handler = make_handler(services[1], counter, tenant, per_minute=2)
    first = record(tenant)
    assert handle(runner, handler, [first]) == ["envelope"]
    for _ in range(3):  # redelivered (a rebalance before the commit): already forwarded
        assert handle(runner, handler, [first]) == []
    assert handle(runner, handler, [record(tenant)]) == ["envelope"]  # the quota's second request
    assert handle(runner, handler, [record(tenant)]) == ["rate_limited"]


def test_a_request_its_quota_refuses_is_not_counted_as_admitted(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    board = PressureBoard(stale_s=30, warn_ratio=0.8)
    board.publish(pressure(OK, 95, 100))  # room for 5 more
    handler = make_handler(services[1], counter, tenant, per_minute=1, board=board)
    assert sorted(handle(runner, handler, [record(tenant) for _ in range(5)])) == ["envelope"] + ["rate_limited"] * 4
    assert board.check(["workers"], "normal") is None  # 96 counted, not 100


def test_a_withdrawn_admission_no_longer_counts_against_the_tenants_share() -> None:
    shares = FairShares(Tenants(), window_s=60)
    shares.admitted("b", now=0)
    shares.admitted("a", now=0)
    assert shares.standing("a", now=1) == "over"  # a second one would be 2 of 3, its share is half
    shares.withdraw("a")  # its quota refused it: never forwarded
    assert shares.standing("a", now=1) == "under"  # 1 of 2
