"""Metrics labels are bounded: a value a caller controls never becomes a new series.

A request's `priority` is any string on the wire; the processors' `invalid` reply
and the client's `queue_full` refusal both count it by priority. 10,000 crafted
values through each real path leave the registry's series count unchanged (each
lands on `other`)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from conversation.model_files import load_counting_tokenizer
from conversation.tokens import TokenCounter
from processors.handler import RequestHandler
from schemas import get_codec
from streams import client_admission, metrics
from streams.client import Client
from streams.config import Settings
from streams.exceptions import QueueFull
from streams.outgoing import Outgoing, now_ms
from streams.pressure import FULL
from streams.request_options import InvalidRequest
from tests.handler_support import request_record

CRAFTED = 10_000


def series_count() -> int:
    return sum(len(family.samples) for family in REGISTRY.collect())


def crafted_priority(i: int) -> str:
    return f"crafted-{i}-" + "x" * (i % 300)


def test_every_label_of_every_metric_has_a_closed_set() -> None:
    with pytest.raises(ValueError, match="closed set"):
        metrics.Counter("tidegate_test_unbounded", "a label nobody bounded", ["topic"])
    assert metrics.bounded_label("priority", "high") == "high"
    assert metrics.bounded_label("priority", "x" * 10_000) == metrics.OTHER
    assert metrics.bounded_label("partition", 7) == "7"
    assert metrics.bounded_label("partition", "acme/3") == "acme/3"  # a tenant's own topic (TENANT_TOPICS)
    assert metrics.bounded_label("partition", "-1") == metrics.OTHER
    assert metrics.bounded_label("partition", "x" * 65 + "/3") == metrics.OTHER


def test_ten_thousand_crafted_priorities_on_the_processors_invalid_path_add_no_series() -> None:
    # no Redis call is made for an invalid request: the client is never connected
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    handler = RequestHandler(
        settings, Redis.from_url(settings.redis_url), TokenCounter(load_counting_tokenizer("default"))
    )
    delivered: list[Outgoing] = []

    async def deliver(outgoing: list[Outgoing]) -> None:
        delivered.extend(outgoing)

    async def run(priorities: list[str]) -> None:
        for start in range(0, len(priorities), 64):
            await handler.handle([request_record(priority=p) for p in priorities[start : start + 64]], deliver)

    asyncio.run(run([crafted_priority(-1)]))  # the `other` series exists from here on
    before = series_count()
    asyncio.run(run([crafted_priority(i) for i in range(CRAFTED)]))
    assert len(delivered) == CRAFTED + 1
    assert all(get_codec().decode(o.value, "InferenceReply")[1]["status"] == "invalid" for o in delivered)
    assert series_count() == before


@pytest.mark.same_on_any_broker  # the client's own refusal: nothing a broker does
def test_ten_thousand_crafted_priorities_on_the_clients_refusal_path_add_no_series(
    settings_factory: object,
) -> None:
    settings = settings_factory()  # type: ignore[operator]
    full = {
        "stage": "processors",
        "lag": 1000,
        "cap": 100,
        "state": FULL,
        "drain_rate": 100.0,
        "drain_time_ms": 10_000,
        "updated_ms": now_ms(),
    }

    async def run() -> int:
        async with Client(settings=settings) as client:
            assert client._pressure is not None
            client._pressure.board.publish(full)  # the path is full: no monitor runs here
            refused = 0
            for i in range(-1, CRAFTED):
                if i == 0:
                    counts.append(series_count())
                # the client's options refuse a crafted priority before admission; the
                # admission's own refusal path (what the counters label) is driven alone
                with pytest.raises(InvalidRequest):
                    await client.submit([{"role": "user", "content": "hi"}], "s", priority=crafted_priority(i))
                request = {"request_id": f"r{i}", "priority": crafted_priority(i), "deadline_ms": 0}
                try:
                    await client_admission.admit(client._pressure.board, request, wait=False)
                except QueueFull:
                    refused += 1
            return refused

    counts: list[int] = []
    assert asyncio.run(run()) == CRAFTED + 1
    assert series_count() == counts[0]
