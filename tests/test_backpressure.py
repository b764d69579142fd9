"""Backpressure on the real stack: told before sending, kept by the processors, nothing lost."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Callable

import orjson
import pytest
from confluent_kafka import Producer

from schemas import get_codec
from streams import Client, Reply
from streams.exceptions import QueueFull
from streams.lag import WORKERS
from streams.outgoing import now_ms
from streams.pressure import TRANSIT_MS
from tests.conftest import Pipeline
from tests.helpers import TopicReader, wait_for

CAP = 20


@pytest.fixture()
def no_worker(pipeline_factory: Callable[..., Pipeline]) -> Pipeline:
    """Monitor and processor only, workers' cap CAP messages: lag builds up on demand."""
    return pipeline_factory(roles=("monitor", "processor"), model="echo", workers_cap_messages=CAP)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def wait_for_lag(client: Client, lag: int, timeout_s: float = 20) -> dict:
    """Waits for a published state with this lag, measured after everything this
    client admitted (so the client no longer adds its own recent sends on top)."""
    since_ms = now_ms() + TRANSIT_MS
    deadline = time.monotonic() + timeout_s
    while True:
        state = client.pressure(WORKERS)
        if state is not None and state["lag"] >= lag and state["updated_ms"] > since_ms:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"workers' lag never reached {lag}: {state}")
        await asyncio.sleep(0.02)


def test_client_is_told_before_sending_and_priorities_are_shed_in_order(no_worker: Pipeline) -> None:
    settings = no_worker.settings

    async def scenario() -> dict:
        async with Client(settings=settings) as client:
            # 17 accepted: lag 17 >= warn line 16. High priority: near the cap the processors'
            # own count of their forwards may run a few ahead of the published lag (forwards in
            # the last FORWARD_TRANSIT_MS before a state are counted twice), and one of 17 normal
            # requests sent back to back could be refused there (seen once in a CI-like run)
            for i in range(17):
                await client.submit(user(f"fill {i}"), f"fill-{i}", deadline_s=120, priority="high")
            state = await wait_for_lag(client, 17)
            assert state["state"] == "warn" and state["cap"] == CAP

            with pytest.raises(QueueFull) as low:
                await client.submit(user("low"), "p-low", priority="low")

            async def until_refused(priority: str, limit: int) -> tuple[int, QueueFull]:
                for n in range(limit):
                    try:
                        await client.submit(
                            user(f"{priority} {n}"), f"p-{priority}-{n}", priority=priority, deadline_s=120
                        )
                    except QueueFull as refused:
                        return n, refused
                raise AssertionError(f"{priority} was never refused")

            # normal passes while the lag (published plus own recent sends) is under the cap
            normals, normal = await until_refused("normal", 10)
            # high passes on, up to 1.25 x cap
            highs, high = await until_refused("high", 20)
            # (the processors may still refuse one of these: their own view of the cap)
            final = await wait_for_lag(client, 17 + normals + highs - 2)
            return {
                "low": low.value,
                "normal": normal,
                "high": high,
                "normals": normals,
                "highs": highs,
                "final_lag": final["lag"],
            }

    result = asyncio.run(scenario())
    low, normal, high = result["low"], result["normal"], result["high"]
    assert low.stage == WORKERS and low.cap == CAP and low.lag >= 16 and low.retry_after_ms > 0
    assert 1 <= result["normals"] <= 3 and normal.lag >= CAP  # refused at the cap, never before warn
    assert result["highs"] >= 1 and high.lag >= 1.25 * CAP  # high goes on past the cap
    assert result["final_lag"] <= 1.25 * CAP  # and nothing got in beyond 1.25 x cap
    # refused before sending: every admitted request is on the topic, no refused one
    admitted = {f"fill-{i}" for i in range(17)}
    admitted |= {f"p-normal-{i}" for i in range(result["normals"])} | {f"p-high-{i}" for i in range(result["highs"])}
    requests = TopicReader(settings, settings.topics.requests)
    try:
        keys = {m.key().decode() for m in requests.wait(lambda ms: len(ms) >= len(admitted), 10, "admitted requests")}
    finally:
        requests.close()
    refused = {"p-low", f"p-normal-{result['normals']}", f"p-high-{result['highs']}"}
    assert keys == admitted and not keys & refused


def test_producer_ignoring_the_signal_is_answered_queue_full_and_nothing_is_lost(no_worker: Pipeline) -> None:
    settings = no_worker.settings
    tag = uuid.uuid4().hex[:6]
    n = 60
    replies = TopicReader(settings, settings.topics.replies)
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    for i in range(n):
        body = {
            "request_id": f"{tag}-{i}",
            "session_id": f"{tag}-s{i % 5}",
            "messages": user(f"ignoring the signal {i}"),
            "reply_to": settings.topics.replies,
        }
        producer.produce(
            settings.topics.requests,
            orjson.dumps(body),
            body["session_id"].encode(),
            headers=[("content-type", b"application/json")],
        )
        producer.poll(0)
    assert producer.flush(10) == 0

    def statuses() -> collections.Counter[str]:
        got = {}
        for m in replies.poll():
            reply = orjson.loads(m.value())
            if reply["request_id"].startswith(tag):
                got[reply["request_id"]] = reply["status"]
        return collections.Counter(got.values())

    refused = wait_for(lambda: statuses()["queue_full"] >= n - 2 * CAP and statuses(), 30, "queue_full replies")
    forwarded = n - refused["queue_full"]
    assert forwarded <= CAP + 5, f"{forwarded} forwarded past a cap of {CAP}"
    sample = next(
        orjson.loads(m.value()) for m in replies.messages if orjson.loads(m.value())["status"] == "queue_full"
    )
    assert sample["retry_after_ms"] > 0 and "past its cap" in sample["error"]

    # a worker joins: every accepted request is answered, none lost
    no_worker.start(("worker",))
    wait_for(lambda: statuses()["ok"] == forwarded, 60, f"{forwarded} ok replies")
    assert sum(statuses().values()) == n
    replies.close()


def test_request_expired_in_the_queue_never_reaches_the_model(no_worker: Pipeline) -> None:
    settings = no_worker.settings

    async def run() -> Reply:
        async with Client(settings=settings, reply_grace_s=60) as client:
            deadline_passed = time.time() + 1.0
            request_id = await client.submit(user("short-lived"), "expiring", deadline_s=1.0)
            # past the deadline while queued for a worker, then a worker starts
            while time.time() < deadline_passed:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(no_worker.start, ("worker",))
            return await client.reply(request_id)

    reply = asyncio.run(run())
    assert reply.status == "expired"
    assert reply.tokens_out == 0 and reply.timings.inference_ms == 0


def test_wait_true_sends_again_after_a_queue_full_reply_until_answered(no_worker: Pipeline) -> None:
    """A client that does not read pressure itself (backpressure off on its side) is
    refused by the processors; with wait=True it sends again, with backoff, until a
    worker drains the stage and the request is answered."""
    settings = no_worker.settings
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    for i in range(CAP + 5):  # the workers' stage past its cap
        body = {
            "request_id": f"fill-{i}-{uuid.uuid4().hex[:6]}",
            "session_id": f"fill-{i}",
            "messages": user("x"),
            "reply_to": settings.topics.replies,
        }
        producer.produce(
            settings.topics.requests, orjson.dumps(body), b"k", headers=[("content-type", b"application/json")]
        )
    assert producer.flush(10) == 0
    request_id = f"patient-{uuid.uuid4().hex[:6]}"
    replies = TopicReader(settings, settings.topics.replies)

    def refused_once() -> bool:
        return any(
            m.key() == request_id.encode()
            and Reply.from_record(get_codec().decode(m.value())[1]).status == "queue_full"
            for m in replies.poll()
        )

    async def scenario() -> Reply:
        blind = settings.model_copy(update={"backpressure": False})
        async with Client(settings=blind, reply_topic=settings.topics.replies) as client:
            call = asyncio.create_task(
                client.generate(user("patient"), "patient", request_id=request_id, deadline_s=90, wait=True)
            )
            await asyncio.to_thread(wait_for, refused_once, 30, "a queue_full reply to the patient request")
            assert not call.done()  # refused, and still waiting
            await asyncio.to_thread(no_worker.start, ("worker",))
            return await call

    try:
        reply = asyncio.run(scenario())
    finally:
        replies.close()
    assert reply.ok and reply.text == "patient"


def test_a_caller_asking_one_at_a_time_never_refuses_itself_at_the_minimum_cap(
    pipeline_factory: Callable[..., Pipeline],
) -> None:
    """At most one request in flight, the workers' cap at its floor of 64: nothing is
    ever near the cap, so nothing may be refused. The client's board once counted its
    own answered requests until a state measured after them (~60 at ~120/s) and
    refused the caller."""
    settings = pipeline_factory(model="echo", workers_cap_messages=64).settings

    async def one_at_a_time() -> collections.Counter[str]:
        outcomes: collections.Counter[str] = collections.Counter()
        async with Client(settings=settings) as client:
            for i in range(600):
                try:
                    reply = await client.generate(user(f"one {i}"), f"one-{i}", max_new_tokens=4)
                    outcomes[reply.status] += 1
                except QueueFull:
                    outcomes["QueueFull"] += 1
        return outcomes

    assert asyncio.run(one_at_a_time()) == {"ok": 600}
