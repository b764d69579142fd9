"""The whole pipeline on the real broker (Apache Kafka, or Tansu) and redis-server (echo model)."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
import uuid
from collections.abc import Callable

import orjson
import pytest
from confluent_kafka import Producer

from processors.envelopes import ENVELOPE_VERSION
from schemas import get_codec
from streams import Client, Reply, Settings
from streams.lag import PROCESSORS
from tests.conftest import Pipeline
from tests.helpers import TopicReader, wait_for, wait_for_stage_lag


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_three_turn_conversation_keeps_history_in_order(echo_pipeline: Pipeline) -> None:
    settings = echo_pipeline.settings
    session = f"conv-{uuid.uuid4().hex[:6]}"
    turns = ["My name is Ada.", "I keep bees.", "What is my name?"]

    async def converse() -> list[Reply]:
        async with Client(settings=settings) as client:
            return [await client.generate(user(t), session, max_new_tokens=16) for t in turns]

    replies = asyncio.run(converse())
    assert [r.status for r in replies] == ["ok"] * 3
    assert [r.text for r in replies] == turns  # echo answers with the user turn, in order

    reader = TopicReader(settings, settings.topics.contexts)
    codec = get_codec()
    envelopes = reader.wait(
        lambda ms: any(codec.decode(m.value())[1]["request_id"] == replies[2].request_id for m in ms),
        20,
        "the third envelope",
    )
    reader.close()
    third = next(e for e in (codec.decode(m.value())[1] for m in envelopes) if e["request_id"] == replies[2].request_id)
    contents = [(t["role"], t["content"]) for t in third["turns"]]
    assert contents == [
        ("user", turns[0]),
        ("assistant", turns[0]),
        ("user", turns[1]),
        ("assistant", turns[1]),
        ("user", turns[2]),
    ]
    assert third["version"] == ENVELOPE_VERSION and third["strategy"] == "window" and not third["degraded"]
    assert 0 < third["tokens_used"] <= third["token_budget"]


def test_200_concurrent_requests_get_exactly_one_ok_reply_each(echo_pipeline: Pipeline) -> None:
    settings = echo_pipeline.settings
    reader = TopicReader(settings, settings.topics.replies)
    tag = uuid.uuid4().hex[:6]

    async def burst() -> list[Reply]:
        async with Client(settings=settings, reply_topic=settings.topics.replies) as client:
            return await asyncio.gather(
                *(
                    client.generate(user(f"question {i}"), f"{tag}-s{i % 20}", max_new_tokens=8, deadline_s=60)
                    for i in range(200)
                )
            )

    replies = asyncio.run(burst())
    assert collections.Counter(r.status for r in replies) == {"ok": 200}
    ids = {r.request_id for r in replies}
    assert len(ids) == 200
    codec = get_codec()
    # every reply on the topic: exactly one per request, no duplicates
    on_topic = reader.wait(
        lambda ms: len({codec.decode(m.value())[1]["request_id"] for m in ms} & ids) == 200, 20, "200 replies"
    )
    counts = collections.Counter(codec.decode(m.value())[1]["request_id"] for m in on_topic)
    assert all(counts[i] == 1 for i in ids)
    reader.close()
    # every request a processor batch took was acked: the processors' group commits to the log end
    wait_for_stage_lag(settings, PROCESSORS, 0, 20)


def test_undecodable_input_goes_to_dead_letter_and_the_stage_goes_on(echo_pipeline: Pipeline) -> None:
    settings = echo_pipeline.settings
    codec = get_codec()
    garbage = os.urandom(64)
    unknown_schema = b"\xc3\x01" + b"\x00" * 8 + b"\x02hi"
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    for topic in (settings.topics.requests, settings.topics.contexts):
        producer.produce(topic, garbage, b"bad-key")
        producer.produce(topic, unknown_schema, b"bad-key")
    assert producer.flush(10) == 0

    reader = TopicReader(settings, settings.topics.dead_letter)
    letters = reader.wait(lambda ms: len(ms) >= 4, 30, "4 dead letters")
    reader.close()
    seen = set()
    for m in letters:
        headers = dict(m.headers())
        seen.add((headers["source.topic"].decode(), m.value()))
        assert headers["error"]
        assert headers["source.offset"].decode().isdigit() and headers["source.partition"].decode().isdigit()
    assert seen >= {
        (t, v) for t in (settings.topics.requests, settings.topics.contexts) for v in (garbage, unknown_schema)
    }
    errors = {dict(m.headers())["error"].decode() for m in letters}
    assert any("unknown schema fingerprint" in e for e in errors)
    assert any("marker" in e for e in errors)

    async def still_answers() -> Reply:
        async with Client(settings=settings) as client:
            return await client.generate(user("still there?"), "after-garbage", max_new_tokens=8)

    reply = asyncio.run(still_answers())
    assert reply.status == "ok" and reply.text == "still there?"
    assert Reply.from_record(codec.decode(codec.encode("InferenceReply", reply.to_record()))[1]) == reply


def test_json_request_from_a_plain_producer_gets_a_json_reply(echo_pipeline: Pipeline) -> None:
    settings = echo_pipeline.settings
    request_id = f"json-{uuid.uuid4().hex}"
    body = {
        "request_id": request_id,
        "session_id": "json-session",
        "messages": [{"role": "user", "content": "hello from json"}],
        "reply_to": settings.topics.replies,
        "max_new_tokens": 8,
    }
    reader = TopicReader(settings, settings.topics.replies)
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    producer.produce(
        settings.topics.requests, orjson.dumps(body), b"json-session", headers=[("content-type", b"application/json")]
    )
    assert producer.flush(10) == 0

    def is_ours(m: object) -> bool:
        return request_id.encode() == m.key()  # type: ignore[attr-defined]

    replies = reader.wait(lambda ms: any(is_ours(m) for m in ms), 30, "the JSON reply")
    reader.close()
    message = next(m for m in replies if is_ours(m))
    assert dict(message.headers())["content-type"] == b"application/json"
    reply = orjson.loads(message.value())
    assert reply["status"] == "ok" and reply["text"] == "hello from json"
    assert set(reply["timings"]) == {"queued_ms", "context_ms", "batch_wait_ms", "inference_ms", "total_ms"}


def test_bad_requests_get_invalid_replies_that_say_why(echo_pipeline: Pipeline) -> None:
    settings = echo_pipeline.settings
    cases = [
        ([], "messages is empty"),
        ([{"role": "wizard", "content": "abracadabra"}], "unknown role 'wizard'"),
        (user("x" * (settings.max_prompt_chars + 1)), "over the limit"),
    ]

    async def send_all() -> list[Reply]:
        async with Client(settings=settings) as client:
            return [await client.generate(messages, "bad-requests", max_new_tokens=8) for messages, _ in cases]

    replies = asyncio.run(send_all())
    for reply, (_, why) in zip(replies, cases, strict=True):
        assert reply.status == "invalid"
        assert why in reply.error


def test_request_past_its_deadline_is_answered_expired(echo_pipeline: Pipeline) -> None:
    """A request whose deadline passed before a processor read it (produced by a plain
    producer: the client itself gives up on a request at its deadline)."""
    settings = echo_pipeline.settings
    request_id = f"late-{uuid.uuid4().hex}"
    created = int(time.time() * 1000) - 5000
    request = {
        "request_id": request_id,
        "session_id": "late-session",
        "messages": user("too late"),
        "created_ms": created,
        "deadline_ms": created + 1000,
        "reply_to": settings.topics.replies,
    }
    reader = TopicReader(settings, settings.topics.replies)
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    producer.produce(
        settings.topics.requests,
        orjson.dumps(request),
        b"late-session",
        headers=[("content-type", b"application/json")],
    )
    assert producer.flush(10) == 0
    replies = reader.wait(lambda ms: any(m.key() == request_id.encode() for m in ms), 30, "the expired reply")
    reader.close()
    reply = orjson.loads(next(m for m in replies if m.key() == request_id.encode()).value())
    assert reply["status"] == "expired"
    assert "deadline" in reply["error"]


def test_identical_greedy_requests_are_answered_from_the_response_cache(echo_pipeline: Pipeline) -> None:
    settings = echo_pipeline.settings
    text = f"cache me {uuid.uuid4().hex[:6]}"

    async def ask() -> list[Reply]:
        async with Client(settings=settings) as client:
            # fresh sessions: the same context (system prompt + the question) each time
            first = await client.generate(user(text), f"c1-{text}", max_new_tokens=8)
            second = await client.generate(user(text), f"c2-{text}", max_new_tokens=8)
            sampled = await client.generate(user(text), f"c3-{text}", max_new_tokens=8, temperature=0.7)
            longer = await client.generate(user(text), f"c4-{text}", max_new_tokens=9)
            return [first, second, sampled, longer]

    first, second, sampled, longer = asyncio.run(ask())
    assert [r.status for r in (first, second, sampled, longer)] == ["ok"] * 4
    assert not first.cache_hit and second.cache_hit
    assert second.text == first.text and second.timings.inference_ms == 0
    assert not sampled.cache_hit  # sampling is never cached
    assert not longer.cache_hit  # other generation parameters: another entry


@pytest.mark.same_on_any_broker  # the cache is Redis's
def test_the_response_cache_is_per_tenant_unless_shared(
    echo_pipeline: Pipeline, pipeline_factory: Callable[..., Pipeline]
) -> None:
    """Tenant B's request is not answered from tenant A's (nor told `cache_hit`);
    with RESPONSE_CACHE_SHARED it is."""
    text = f"tenant cache {uuid.uuid4().hex[:6]}"

    async def ask(settings: Settings) -> list[Reply]:
        run = uuid.uuid4().hex[:6]  # fresh conversations: the same prompt each time
        async with Client(settings=settings) as client:
            return [
                await client.generate(user(text), f"{tenant}-{i}-{run}", max_new_tokens=8, tenant=tenant)
                for i, tenant in enumerate(["acme", "globex", "acme"])
            ]

    a, b, a_again = asyncio.run(ask(echo_pipeline.settings))
    assert (a.cache_hit, b.cache_hit, a_again.cache_hit) == (False, False, True)
    shared = pipeline_factory(("processor", "worker"), model="echo", response_cache_shared=True)
    a, b, a_again = asyncio.run(ask(shared.settings))
    assert (a.cache_hit, b.cache_hit, a_again.cache_hit) == (False, True, True)


def test_submitted_requests_are_answered_through_reply_and_the_replies_iterator(echo_pipeline: Pipeline) -> None:
    settings = echo_pipeline.settings
    tag = uuid.uuid4().hex[:6]

    async def scenario() -> tuple[Reply, list[Reply], int]:
        async with Client(settings=settings) as client:
            first = await client.submit(user(f"{tag} by id"), f"{tag}-a", max_new_tokens=8)
            by_id = await client.reply(first)
            ids = [await client.submit(user(f"{tag} stream {i}"), f"{tag}-s{i}", max_new_tokens=8) for i in range(5)]
            streamed: list[Reply] = []
            async for reply in client.replies():
                streamed.append(reply)
                if len(streamed) == len(ids):
                    break
            assert {r.request_id for r in streamed} == set(ids)
            return by_id, streamed, client.pending_count()

    by_id, streamed, left = asyncio.run(scenario())
    assert by_id.ok and by_id.text == f"{tag} by id"
    assert all(r.ok and r.text.startswith(f"{tag} stream") for r in streamed)
    assert left == 0


def test_a_duplicate_reply_on_the_topic_is_handed_over_once(echo_pipeline: Pipeline) -> None:
    """A redelivered reply (the same request_id twice on the reply topic) reaches the caller once."""
    settings = echo_pipeline.settings
    codec = get_codec()

    async def scenario() -> tuple[Reply, list[Reply]]:
        async with Client(settings=settings) as client:
            first = await client.generate(user("once"), f"dup-{uuid.uuid4().hex[:6]}", max_new_tokens=8)
            second_id = await client.submit(user("twice"), f"dup-{uuid.uuid4().hex[:6]}", max_new_tokens=8)
            copies = Producer({"bootstrap.servers": settings.bootstrap})
            for reply_id in (first.request_id, second_id, second_id):
                record = Reply(request_id=reply_id, status="ok", text="copy").to_record()
                copies.produce(client.reply_topic, codec.encode("InferenceReply", record), reply_id.encode())
            assert copies.flush(10) == 0
            got: list[Reply] = []

            async def drain() -> None:
                async for reply in client.replies():
                    got.append(reply)

            task = asyncio.create_task(drain())
            deadline = asyncio.get_running_loop().time() + 30
            while not got and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)  # an absence: watch a second for another copy
            task.cancel()
            return first, got

    first, got = asyncio.run(scenario())
    assert first.ok and first.text == "once"
    assert len(got) == 1  # the second request, once: its first copy or the real reply


def test_each_client_reads_only_its_own_replies_however_many_clients(echo_pipeline: Pipeline) -> None:
    """Reply traffic per client is flat: with 1 client and with 20, each reads exactly
    its own replies off its own reply topic (on one shared reply topic, each of 20
    clients would read all 20 clients' replies, as the last round shows)."""
    settings = echo_pipeline.settings
    per_client = 10

    async def round_of(clients: int, shared: bool) -> list[int]:
        topic = settings.topics.replies if shared else None
        opened = [Client(settings=settings, reply_topic=topic) for _ in range(clients)]
        for client in opened:
            await client.start()
        try:
            replies = await asyncio.gather(
                *(
                    client.generate(user(f"mine {c} {i}"), f"own-{c}-{uuid.uuid4().hex[:6]}", max_new_tokens=4)
                    for c, client in enumerate(opened)
                    for i in range(per_client)
                )
            )
            assert [r.status for r in replies] == ["ok"] * clients * per_client
            if shared:  # every client reads everything on the shared topic: wait for all of it
                await asyncio.to_thread(
                    wait_for, lambda: all(c.replies_read >= clients * per_client for c in opened), 30, "all replies"
                )
            return [client.replies_read for client in opened]
        finally:
            for client in opened:
                await client.close()

    one = asyncio.run(round_of(1, shared=False))
    twenty = asyncio.run(round_of(20, shared=False))
    shared = asyncio.run(round_of(20, shared=True))
    print(f"REPLY TRAFFIC per client: 1 client {one}, 20 clients {sorted(set(twenty))}, shared {sorted(set(shared))}")
    assert one == [per_client] and twenty == [per_client] * 20
    assert min(shared) >= 20 * per_client


def test_a_client_that_closes_with_replies_in_flight_holds_up_nobody(echo_pipeline: Pipeline) -> None:
    """The worker is held (SIGSTOP) while a client submits and closes; its replies are
    produced after it left. The next caller is still answered at once (when clients
    deleted their reply topics on close, such replies held the worker for minutes)."""
    settings = echo_pipeline.settings
    worker = echo_pipeline.pids["worker"]

    async def scenario() -> float:
        os.kill(worker, signal.SIGSTOP)
        try:
            async with Client(settings=settings) as leaving:
                for i in range(5):
                    await leaving.submit(user(f"gone {i}"), f"gone-{i}", max_new_tokens=4, deadline_s=60)
        finally:
            os.kill(worker, signal.SIGCONT)
        async with Client(settings=settings) as staying:
            started = time.monotonic()
            reply = await staying.generate(user("still here"), "staying", max_new_tokens=4, deadline_s=60)
            assert reply.status == "ok"
            return time.monotonic() - started

    assert asyncio.run(scenario()) < 15  # a session timeout's worth of rejoining at most
