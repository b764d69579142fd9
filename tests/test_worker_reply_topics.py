"""A worker decides a fetched batch's unseen reply_to names once, bounded (issue 25, item 8).

The worker checks each envelope's `reply_to` against the broker's topic listing
(streams/reply_topics.py). It asked once per unseen name, on its own loop, as each
record entered its pool: a flood of envelopes naming distinct made-up reply topics
(anyone allowed to write the contexts topic can send one) made one listing per
record, and every row of the running batch waited for its next decode step
meanwhile. Now each fetch's records are decoded together (inference/jobs.py
`decode_fetched`), their unseen names in one listing with a bounded wait.

The measures: the listings the worker asked its real producer for (counted on the
way through, the broker answers them), and the time the running batch stood still.
One streamed request generates while the flood arrives; its chunks carry the time
each was built (`sent_ms`, one chunk per decode step with `stream_interval_ms=0`),
so the longest gap between two chunks is the longest the batch waited. On a
loopback broker a listing takes about a millisecond, so the gap barely differs
(0.25 s either way, figures in the run's output); the listings do: 600 before (one
per name; each up to 5 s on a slow broker), a few after (one per fetch).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Message, Producer

from inference.jobs import Job, decode_fetched
from inference.runners import load_runner
from inference.worker import InferenceWorker
from schemas import get_codec
from streams.config import Settings
from streams.kafka import producer_config
from streams.reply_topics import LIST_TIMEOUT_S, LIST_WAIT_S, ReplyTopics
from tests.helpers import TopicReader, wait_for
from tests.hostile import envelope
from tidegate.processes import free_port

FLOOD = 600  # envelopes, each naming a reply topic of its own that does not exist
# the longest the running batch may stand still while the flood is decoded: one fetch's
# bounded wait for its listing, and a margin (a broker holding thousands of topics, as the
# suite's does by then, takes over a second to list them: 2.42 s seen in a full run)
STALL_LIMIT_S = LIST_WAIT_S + 1.0
LISTINGS_LIMIT = FLOOD // 10  # one per fetch: a fetch returns tens of records


class CountedListings:
    """The worker's real producer, its topic listings counted on the way through."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.asked = 0

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> object:
        self.asked += 1
        return self.producer.list_topics(topic, timeout=timeout)


@pytest.mark.timeout(300)
def test_a_flood_of_unseen_reply_to_names_does_not_stall_the_decode_steps(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(model="tiny", torch_threads=1, stream_interval_ms=0, prefetch_limit=256)
    worker = InferenceWorker(settings, load_runner("tiny", torch_threads=1))
    worker.warm_up()
    listings = worker.reply_topics.source = CountedListings(worker.replies.producer)
    thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    producer = Producer(producer_config(settings))
    codec = get_codec()
    replies = TopicReader(settings, settings.topics.replies)
    dead = TopicReader(settings, settings.topics.dead_letter)
    tag = uuid.uuid4().hex[:8]
    long_id = f"{tag}-long"

    def chunks() -> list[dict]:
        found = []
        for message in replies.poll():
            name, record = codec.decode(message.value())
            if name == "InferenceChunk" and record["request_id"] == long_id:
                found.append(record)
        return found

    def replied() -> bool:
        return any(codec.decode(m.value())[0] == "InferenceReply" for m in replies.messages)

    thread.start()
    try:
        streamed = envelope(settings, long_id, stream=True, max_new_tokens=settings.max_new_tokens_limit)
        producer.produce(settings.topics.contexts, codec.encode("ContextEnvelope", streamed), key=long_id.encode())
        producer.flush(10)
        wait_for(lambda: len(chunks()) >= 5, 60, "the streamed request generating")

        flood_at, asked_before = time.time(), listings.asked
        names = [f"{settings.topics.replies}.acme.{uuid.uuid4().hex}" for _ in range(FLOOD)]
        for i, name in enumerate(names):
            record = envelope(settings, f"{tag}-{i}", reply_to=name)
            producer.produce(settings.topics.contexts, codec.encode("ContextEnvelope", record), key=f"{i}".encode())
        producer.flush(30)
        dead.wait(lambda found: len(found) >= FLOOD, 120, "every flooded envelope dead-lettered")
        flood_done, asked = time.time(), listings.asked - asked_before
        assert thread.is_alive()
        assert not replied(), "the streamed request ended before the flood was decoded: nothing measured"
        steps = [c["sent_ms"] / 1000 for c in chunks() if flood_at <= c["sent_ms"] / 1000 <= flood_done]
    finally:
        worker.stopping.set()
        thread.join(30)
        replies.close()
        dead.close()
    reasons = {dict(m.headers() or []).get("error", b"").decode() for m in dead.messages}
    # each refused alone, with its reason: by the listing ("does not exist") or, where a
    # listing in flight when the name was first seen could not say (it may only say a
    # name exists), by the broker refusing its reply, the record's fallback ("refused")
    assert all("does not exist" in r or "refused" in r for r in reasons), reasons
    points = [flood_at, *steps, flood_done]
    longest = max(b - a for a, b in itertools.pairwise(points))
    print(
        f"REPLY_TO worker: {FLOOD} unseen names decoded in {flood_done - flood_at:.2f}s with {asked} listings,"
        f" longest step gap {longest:.3f}s"
    )
    assert asked <= LISTINGS_LIMIT, f"{asked} listings for {FLOOD} names: one per record"
    assert longest < STALL_LIMIT_S, f"the running batch stood still for {longest:.2f}s"


def test_a_fetch_of_unseen_names_while_the_broker_is_silent_waits_once_and_bounded() -> None:
    """The fault: a real producer whose broker is gone, so a listing waits out its own
    timeout (5 s). A fetch of three records naming unseen reply topics waited that per
    record (15 s, the running batch standing still); now once, at most LIST_WAIT_S,
    and the names are left to the delivery (its fallback dead-letters a missing one)."""
    settings = Settings(bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    producer = Producer(producer_config(settings))
    reply_topics = ReplyTopics(settings, producer)
    codec = get_codec()
    records = [
        Message(
            topic=settings.topics.contexts,
            partition=0,
            offset=i,
            key=f"{i}".encode(),
            value=codec.encode(
                "ContextEnvelope", envelope(settings, f"r{i}", reply_to=f"{settings.topics.replies}.acme.{i}")
            ),
        )
        for i in range(3)
    ]
    jobs: dict[tuple[str, int, int], Job] = {}
    runner = load_runner("echo")
    started = time.monotonic()
    try:
        decode_fetched(records, jobs, runner, settings, reply_topics)
    finally:
        producer.flush(0)
    took = time.monotonic() - started
    print(f"REPLY_TO worker, broker silent: 3 unseen names decoded in {took:.2f}s")
    assert took < LIST_WAIT_S + 1 < LIST_TIMEOUT_S, f"decoding waited {took:.1f}s on the broker"
    assert len(jobs) == 3 and all(j.dead_letter is None and j.prompt is not None for j in jobs.values())
