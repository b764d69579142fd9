"""The processors' reply_to check is bounded in time and memory (streams/reply_topics.py).

Unseen reply_to names while the broker does not answer its metadata requests (the
fault: a real producer whose broker is gone) must not stop the processors' loop;
and a flood of distinct names keeps at most `KEPT` of each kind."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from redis.asyncio import Redis

from conversation.model_files import load_counting_tokenizer
from conversation.tokens import TokenCounter
from processors.handler import Incoming, RequestHandler
from streams.config import Settings
from streams.delivery import DeliveryProducer
from streams.kafka import producer_config
from streams.outgoing import Outgoing
from streams.reply_topics import KEPT, LIST_WAIT_S, ReplyTopics
from tests.handler_support import request_record
from tidegate.processes import free_port


def record(reply_to: str) -> Incoming:
    return request_record(reply_to=reply_to)


class Listing:
    """A broker's topic listing, counting how often it is asked for."""

    def __init__(self, topics: set[str]) -> None:
        self.topics = topics
        self.asked = 0

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> object:
        self.asked += 1
        return type("Metadata", (), {"topics": dict.fromkeys(self.topics)})()


def test_unseen_reply_topics_while_the_broker_is_silent_do_not_stop_the_loop() -> None:
    settings = Settings(bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    producer = DeliveryProducer(producer_config(settings))  # its broker is gone: each listing waits 5 s
    redis = Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    handler = RequestHandler(
        settings, redis, TokenCounter(load_counting_tokenizer("default")), None, ReplyTopics(settings, producer)
    )
    replies = settings.topics.replies
    delivered: list[Outgoing] = []

    async def deliver(outgoing: list[Outgoing]) -> None:
        delivered.extend(outgoing)

    async def run() -> tuple[float, float]:
        gaps = [0.0]
        stop = asyncio.Event()

        async def tick() -> None:  # what faust's heartbeats and commits need: a loop that turns
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.02)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        for _ in range(2):  # the second batch waits on the listing still running, not on a new one
            await handler.handle([record(f"{replies}.acme.{uuid.uuid4().hex}") for _ in range(3)], deliver)
        took = time.monotonic() - started
        stop.set()
        await ticker
        return max(gaps), took

    try:
        longest_gap, took = asyncio.run(run())
    finally:
        producer.close(0)
    print(f"REPLY_TO longest loop stall {longest_gap:.3f}s, two batches in {took:.2f}s")
    assert longest_gap < 0.5, f"the loop stood still for {longest_gap:.1f}s"
    assert took < 2 * LIST_WAIT_S + 2, took
    assert len(delivered) == 6  # not refused: the delivery decides (its fallback dead-letters)


def test_a_flood_of_distinct_reply_to_names_keeps_a_bounded_number_of_them() -> None:
    settings = Settings()
    replies = settings.topics.replies
    existing = {f"{replies}.a.{i}" for i in range(2 * KEPT)}
    broker = Listing({replies, *existing})
    topics = ReplyTopics(settings, broker)

    async def flood() -> None:
        names = sorted(existing) + [f"{replies}.a.missing-{i}" for i in range(2 * KEPT)]
        for start in range(0, len(names), 500):
            batch = names[start : start + 500]
            await topics.prepare(batch)
            verdicts = [topics.reason(name, ask=False) for name in batch]
            assert all((v is None) == (name in existing) for name, v in zip(batch, verdicts, strict=True))

    asyncio.run(flood())
    assert len(topics._known) <= KEPT and len(topics._missing) <= KEPT
    assert broker.asked == 4 * KEPT // 500  # one listing per batch, not one per name
    asked = broker.asked
    recent = sorted(existing)[-1]
    assert topics.reason(recent) is None and broker.asked == asked  # the most recent are still known


def test_a_listing_begun_before_a_name_was_seen_does_not_call_its_topic_missing() -> None:
    """A client creates its reply topic just before its first request: a listing
    still running from an earlier batch may not have it, and must not condemn it."""
    settings = Settings()
    replies = settings.topics.replies
    first, young = f"{replies}.a.first", f"{replies}.a.young"
    release = threading.Event()

    class SlowBroker(Listing):
        def list_topics(self, topic: str | None = None, timeout: float = -1) -> object:
            snapshot = set(self.topics)  # what the broker has when the request reaches it
            if self.asked == 0:
                release.wait(10)
            self.asked += 1
            return type("Metadata", (), {"topics": dict.fromkeys(snapshot)})()

    broker = SlowBroker({replies, first})
    topics = ReplyTopics(settings, broker, wait_s=0.3)

    async def batches() -> None:
        await topics.prepare([first])  # its listing hangs past the wait
        assert topics.reason(first, ask=False) is None  # not decided: the delivery's
        broker.topics.add(young)  # created after that listing began
        threading.Timer(0.05, release.set).start()
        await topics.prepare([young])  # waits on the old listing, then asks again

    asyncio.run(batches())
    assert broker.asked == 2
    assert topics.reason(young, ask=False) is None and young in topics._known
