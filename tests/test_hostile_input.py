"""Hostile input hurts no one: each malformed or crafted record gets its own dead letter
or `invalid` reply, never its batch's; a record too large for the dead-letter topic
is dead-lettered truncated; a reply topic that does not exist stalls nothing; and
10,000 generated records per input topic leave the valid traffic answered, no
process restarted and memory flat."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import math
import multiprocessing
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from schemas import SerializationError, get_codec
from schemas.codec import content_type
from streams import Client, Settings
from streams.delivery import DeliveryFailed, DeliveryProducer
from streams.kafka import producer_config
from streams.outgoing import DEAD_LETTER_MAX_BYTES, Outgoing, dead_letter
from streams.reply_topics import ReplyTopics
from streams.validation import field_reason, reply_to_reason
from tests.conftest import BROKER, Pipeline
from tests.hostile import JSON_HEADER, Accounts, Sent, avro_request, envelope, generated_records, produce_all, request

# the checks are tidegate's own, whatever the broker
pytestmark = [pytest.mark.integration, pytest.mark.same_on_any_broker]

FUZZ_RECORDS = int(os.environ.get("FUZZ_RECORDS", 10_000))  # per input topic
VALID_ALONGSIDE = 100


def test_a_content_type_header_that_is_not_utf8_is_the_records_error() -> None:
    with pytest.raises(SerializationError, match="not UTF-8"):
        content_type([("content-type", b"\xff\xfeapplication/json")])
    with pytest.raises(SerializationError, match="no value"):
        content_type([("content-type", None)])  # type: ignore[list-item]


def test_a_dead_letter_over_the_limit_is_truncated_with_its_size_and_digest() -> None:
    value = os.urandom(DEAD_LETTER_MAX_BYTES * 3)
    letter = dead_letter("dl", value, b"k", reason="r", source_topic="t", partition=0, offset=1, stage="s")
    headers = dict(letter.headers)
    assert len(letter.value) == DEAD_LETTER_MAX_BYTES and letter.value == value[:DEAD_LETTER_MAX_BYTES]
    assert headers["original.size"] == str(len(value)).encode()
    assert headers["original.sha256"] == hashlib.sha256(value).hexdigest().encode()
    small = dead_letter("dl", b"abc", b"k", reason="r", source_topic="t", partition=0, offset=1, stage="s")
    assert small.value == b"abc" and "truncated" not in dict(small.headers)


def test_shared_checks_refuse_what_could_hurt_a_stage() -> None:
    settings = Settings()
    good = {"request_id": "r", "session_id": "s", "tenant": "t", "max_new_tokens": 8, "temperature": 0.5}
    assert field_reason(good, settings) is None
    for field, value, why in [
        ("temperature", math.nan, "finite"),
        ("temperature", math.inf, "finite"),
        ("temperature", -1.0, "finite"),
        ("max_new_tokens", 10**9, "max_new_tokens"),
        ("max_new_tokens", 0, "max_new_tokens"),
        ("request_id", "x" * 10_000, "request_id is 10000 characters"),
        ("session_id", "x" * 10_000, "session_id"),
        ("request_id", "", "empty"),
    ]:
        reason = field_reason({**good, field: value}, settings)
        assert reason is not None and why in reason, (field, value, reason)
    replies = settings.topics.replies
    assert reply_to_reason(replies, settings) is None
    assert reply_to_reason(f"{replies}.tenant-a", settings) is None
    for wrong in (settings.topics.requests, settings.topics.contexts, f"{replies}x", "elsewhere"):
        assert reply_to_reason(wrong, settings) is not None


def test_a_reply_topic_created_a_moment_ago_is_found_and_a_missing_one_asked_about_sparingly() -> None:
    """A client creates its reply topic just before its first request: a listing
    taken a moment before must not make that request unanswerable."""
    settings = Settings()
    replies = settings.topics.replies

    class Broker:
        def __init__(self) -> None:
            self.topics: dict[str, object] = {replies: object()}
            self.asked = 0

        def list_topics(self, topic: str | None = None, timeout: float = -1) -> object:
            self.asked += 1
            return type("Metadata", (), {"topics": dict(self.topics)})()

    broker = Broker()
    topics = ReplyTopics(settings, broker, refresh_s=60)
    assert topics.reason(f"{replies}.a.one") is not None  # missing: asked once
    broker.topics[f"{replies}.a.two"] = object()
    assert topics.reason(f"{replies}.a.two") is None  # created since: a new name is asked about
    asked = broker.asked
    for _ in range(100):
        assert topics.reason(f"{replies}.a.one") is not None
    assert broker.asked == asked  # a missing name again only after refresh_s
    assert topics.reason(f"{replies}.a.two") is None and broker.asked == asked  # a known one never


def test_a_record_refused_for_good_is_replaced_by_its_fallback(settings_factory: Callable[..., Settings]) -> None:
    """Too large for the broker, or for a topic that does not exist: the fallback (the
    input's dead letter) goes instead, the rest of the batch is delivered; no fallback:
    DeliveryFailed, never a silent drop. (Tansu creates a topic on its first record:
    there only the record too large is refused.)"""
    settings = settings_factory()
    dead = settings.topics.dead_letter
    fallback = Outgoing(dead, b"k", b"the input", [("error", b"reply refused")])
    batch = [
        Outgoing(settings.topics.replies, b"k", b"fine"),
        Outgoing(settings.topics.replies, b"k", os.urandom(2_000_000), fallback=fallback),
    ]
    if BROKER == "kafka":
        batch.append(Outgoing(f"{settings.topics.replies}.gone", b"k", b"nowhere", fallback=fallback))
    accounts = Accounts(settings)
    delivery = DeliveryProducer(producer_config(settings))

    async def send(records: list[Outgoing]) -> None:
        await delivery.send_all(records)

    try:
        asyncio.run(send(batch))
        letters = accounts.letters.wait(lambda ms: len(ms) >= len(batch) - 1, 30, "the fallbacks")
        errors = sorted(dict(m.headers())["delivery.error"].decode().lower() for m in letters)
        assert any("too large" in e for e in errors), errors
        assert BROKER != "kafka" or any("unknown topic" in e for e in errors), errors
        assert [m.value() for m in accounts.replies.wait(lambda ms: len(ms) >= 1, 30, "the fine one")] == [b"fine"]
        with pytest.raises(DeliveryFailed, match="too large"):
            asyncio.run(send([Outgoing(settings.topics.replies, b"k", os.urandom(2_000_000))]))
    finally:
        delivery.close()
        accounts.close()


@pytest.fixture(scope="module")
def hostile_pipeline(pipeline_factory: Callable[..., Pipeline]) -> Pipeline:
    return pipeline_factory(model="echo", max_prompt_chars=2000, workers_cap_messages=100_000)


def _valid_json(settings: Settings, n: int, tag: str) -> list[tuple[str, bytes, list, str]]:
    return [
        (settings.topics.requests, orjson.dumps(request(settings, f"{tag}{i}")), [JSON_HEADER], f"{tag}{i}")
        for i in range(n)
    ]


def test_each_crafted_record_is_answered_or_dead_lettered_alone(hostile_pipeline: Pipeline) -> None:
    """The issue's mix, on the real broker: crafted records among 100 valid JSON
    requests, in the same batches. Every valid one is answered ok; each crafted one
    gets its own dead letter or `invalid` reply saying why."""
    settings = hostile_pipeline.settings
    codec = get_codec()
    tag = f"mix{uuid.uuid4().hex[:6]}-"
    req, ctx, replies = settings.topics.requests, settings.topics.contexts, settings.topics.replies
    deep = b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    # (topic, value, headers, request_id, expected: "dead:<reason>" or "invalid:<reason>")
    crafted = [
        (req, orjson.dumps(request(settings, f"{tag}hdr")), [("content-type", b"\xff\xfe")], None, "dead:not UTF-8"),
        (req, os.urandom(900 * 1024), [], None, "dead:marker"),
        (
            req,
            orjson.dumps(request(settings, f"{tag}nt", reply_to=f"{replies}.nope")),
            [JSON_HEADER],
            None,
            "dead:does not exist",
        ),
        (req, orjson.dumps(request(settings, f"{tag}wt", reply_to=req)), [JSON_HEADER], None, "dead:is not"),
        (
            req,
            codec.encode("InferenceRequest", avro_request(settings, f"{tag}nan", temperature=math.nan)),
            [],
            f"{tag}nan",
            "invalid:finite",
        ),
        (req, deep, [JSON_HEADER], None, "dead:invalid JSON"),
        (
            req,
            orjson.dumps(request(settings, f"{tag}ty", max_new_tokens="lots")),
            [JSON_HEADER],
            None,
            "dead:does not match",
        ),
        (
            req,
            orjson.dumps(request(settings, f"{tag}id", session_id="s" * 10_000)),
            [JSON_HEADER],
            f"{tag}id",
            "invalid:session_id is 10000",
        ),
        (req, b"{}", [("content-type", None)], None, "dead:no value"),
        (
            req,
            orjson.dumps(request(settings, f"{tag}sys", messages=[{"role": "system", "content": ""}])),
            [JSON_HEADER],
            f"{tag}sys",
            "invalid:only system messages",
        ),
        (
            ctx,
            codec.encode("ContextEnvelope", envelope(settings, f"{tag}empty", turns=[])),
            [],
            f"{tag}empty",
            "invalid:cannot take this prompt",
        ),
        (ctx, os.urandom(300), [], None, "dead:marker"),
        (ctx, codec.encode("ContextEnvelope", envelope(settings, f"{tag}ewt", reply_to=req)), [], None, "dead:is not"),
        (
            ctx,
            codec.encode("ContextEnvelope", envelope(settings, f"{tag}ent", reply_to=f"{replies}.nope")),
            [],
            None,
            "dead:does not exist",
        ),
        (
            ctx,
            codec.encode("ContextEnvelope", envelope(settings, f"{tag}big", max_new_tokens=10**9)),
            [],
            f"{tag}big",
            "invalid:max_new_tokens",
        ),
        (
            ctx,
            codec.encode("ContextEnvelope", envelope(settings, f"{tag}enan", temperature=math.inf)),
            [],
            f"{tag}enan",
            "invalid:finite",
        ),
    ]
    garbage = [(req if i % 2 else ctx, os.urandom(64 + i), [], None, "dead:marker") for i in range(200)]
    valid = [(*r, "ok") for r in _valid_json(settings, VALID_ALONGSIDE, tag)]
    mixed = crafted + garbage
    # in the same batches: a valid request after every three hostile records
    records = []
    for i, record in enumerate(mixed):
        records.append(record)
        if i % 3 == 2 and valid:
            records.append(valid.pop())
    records += valid
    accounts = Accounts(settings)
    try:
        sent = produce_all(settings.bootstrap, [r[:4] for r in records])
        accounts.wait_all(sent, 90, records)
        sources, answered = accounts.sources(), accounts.replied()
        for record, where in zip(records, sent, strict=True):
            kind, _, why = record[4].partition(":")
            if kind == "dead":
                letter = sources.get((where.topic, where.partition, where.offset))
                assert letter is not None, (record[4], where)
                assert why in dict(letter.headers())["error"].decode(), (dict(letter.headers())["error"], record[4])
            else:
                reply = codec.decode_message(
                    answered[record[3]].value(), answered[record[3]].headers(), "InferenceReply"
                )[0]
                assert reply["status"] == ("ok" if kind == "ok" else "invalid"), (reply, record[4])
                assert kind == "ok" or why in reply["error"], (reply["error"], record[4])
        where = sent[[r[1] for r in records].index(crafted[1][1])]
        big = sources[(where.topic, where.partition, where.offset)]
        assert len(big.value()) == DEAD_LETTER_MAX_BYTES
        assert dict(big.headers())["original.size"] == str(900 * 1024).encode()
    finally:
        accounts.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.timeout(900)
def test_ten_thousand_generated_records_per_input_topic(hostile_pipeline: Pipeline) -> None:
    """hypothesis generates FUZZ_RECORDS records for each input topic (raw bytes, JSON
    with random or out-of-bounds fields, Avro with values anywhere in their types, Avro
    cut short or flipped, random headers), sent in two halves with valid requests
    alongside. Each generated record is dead-lettered or answered; every valid request
    is answered ok; the stages keep their process ids; memory stays flat from the
    first half to the second."""
    settings = hostile_pipeline.settings
    pids = {role: pid for role, pid in hostile_pipeline.pids.items() if role != "monitor"}
    tag = f"fz{uuid.uuid4().hex[:6]}-"
    topics = (settings.topics.requests, settings.topics.contexts)
    # hypothesis generates on one core at a time: one process per topic halves the ~60 s
    # the 20,000 records took in this process alone (spawned: this process runs
    # librdkafka's threads, which a fork would copy mid-flight)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(topics), mp_context=spawn) as pool:
        generating = {
            topic: pool.submit(generated_records, settings, topic, FUZZ_RECORDS, f"{tag}{topic[-3:]}")
            for topic in topics
        }
        fuzz = {topic: future.result() for topic, future in generating.items()}
    accounts = Accounts(settings)
    rss: list[dict[str, float]] = []

    async def valid_alongside(half: int) -> list[str]:
        async with Client(settings=settings, reply_grace_s=60) as client:
            replies = await asyncio.gather(
                *(
                    client.generate(
                        [{"role": "user", "content": f"valid {half} {i}"}],
                        f"v{i}",
                        max_new_tokens=8,
                        wait=True,  # past the flood's queue_full, as a well-behaved caller does
                        deadline_s=240,
                    )
                    for i in range(VALID_ALONGSIDE // 2)
                )
            )
        return [r.status for r in replies]

    async def warm_up() -> None:
        """The processors load their embedding model (~80 MB) on the first `relevance`
        request with a history: once, before memory is measured (a fuzzed request that
        did it in the second half read as 80 MB of growth)."""
        async with Client(settings=settings) as client:
            for turn in range(2):
                reply = await client.generate(
                    [{"role": "user", "content": f"warm up {turn}"}], f"{tag}warm", strategy="relevance", wait=True
                )
                assert reply.ok, reply

    try:
        asyncio.run(warm_up())
        all_sent: list[Sent] = []
        for half in range(2):
            records = [
                r for recs in fuzz.values() for r in recs[half * FUZZ_RECORDS // 2 : (half + 1) * FUZZ_RECORDS // 2]
            ]
            sent = produce_all(settings.bootstrap, records)
            statuses = asyncio.run(valid_alongside(half))
            assert statuses == ["ok"] * len(statuses), statuses
            accounts.wait_all(sent, 300, records)
            all_sent += sent
            rss.append({role: _rss_mb(pid) for role, pid in pids.items()})
        for role, pid in pids.items():
            os.kill(pid, 0)  # still the same process: never restarted
            assert hostile_pipeline.pids[role] == pid
        growth = {role: rss[1][role] - rss[0][role] for role in pids}
        print(f"FUZZ {len(all_sent)} records accounted for; RSS MB after each half {rss}; growth {growth}")
        assert all(g < 32 for g in growth.values()), growth
    finally:
        accounts.close()
