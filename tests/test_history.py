"""The processors' handler against a real redis-server: history, embeddings cache,
Redis outages (degraded, no crash) and recovery."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from conversation.history import HistoryWriter, embeddings_key, encode_turn, history_key, loaded_history
from conversation.model_files import load_counting_tokenizer
from conversation.tokens import TokenCounter
from processors.compression import compress
from processors.handler import Incoming, RequestHandler
from schemas import get_codec
from streams.config import Settings
from streams.outgoing import Outgoing
from tests.conftest import LOG_DIR
from tidegate import devstack, processes

# Redis and the compression: nothing a broker does
pytestmark = pytest.mark.same_on_any_broker


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(load_counting_tokenizer("default"))


def incoming(text: str, session: str, tenant: str = "acme", strategy: str | None = None) -> Incoming:
    request = {
        "request_id": uuid.uuid4().hex,
        "session_id": session,
        "tenant": tenant,
        "messages": [{"role": "user", "content": text}],
        "priority": "normal",
        "max_new_tokens": 8,
        "temperature": 0.0,
        "created_ms": 0,
        "deadline_ms": 0,
        "reply_to": "tidegate.replies",
        "strategy": strategy,
        "metadata": {},
    }
    return Incoming(get_codec().encode("InferenceRequest", request), b"k", [], "requests", 0, 0)


def envelope(out: list[Outgoing]) -> dict:
    assert len(out) == 1
    return get_codec().decode(out[0].value, "ContextEnvelope")[1]


_runner: asyncio.Runner | None = None


@pytest.fixture(autouse=True)
def event_loop_runner() -> object:
    """One event loop per test: the handler's Redis connections live on it."""
    global _runner
    with asyncio.Runner() as runner:
        _runner = runner
        yield runner
    _runner = None


def handle(handler: RequestHandler, *records: Incoming) -> list[Outgoing]:
    """What the handler delivers for `records` (each delivery acknowledged at once)."""
    assert _runner is not None
    delivered: list[Outgoing] = []

    async def deliver(outgoing: list[Outgoing]) -> None:
        delivered.extend(outgoing)

    _runner.run(handler.handle(list(records), deliver))
    return delivered


def make_handler(redis_url: str, counter: TokenCounter, **overrides: object) -> RequestHandler:
    settings = Settings(redis_url=redis_url, **overrides)  # type: ignore[arg-type]
    return RequestHandler(settings, Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1), counter)


def test_history_is_stored_with_token_counts_and_read_back(services: tuple[str, str], counter: TokenCounter) -> None:
    handler = make_handler(services[1], counter, history_max_turns=3)
    session = f"s-{uuid.uuid4().hex[:6]}"
    for i in range(4):
        handle(handler, incoming(f"turn {i}", session))
    env = envelope(handle(handler, incoming("last", session)))
    assert [t["content"] for t in env["turns"]] == ["turn 1", "turn 2", "turn 3", "last"]  # max 3 kept
    raw = redis.Redis.from_url(services[1]).lrange(history_key("acme", session), 0, -1)
    assert len(raw) == 3 and all(r.split(b"\t", 1)[0].isdigit() for r in raw)  # "<tokens>\t<turn json>"
    assert redis.Redis.from_url(services[1]).ttl(history_key("acme", session)) > 0


def test_window_reads_only_the_turns_it_keeps_and_a_redelivery_changes_nothing(
    services: tuple[str, str], counter: TokenCounter
) -> None:
    budget = 700
    handler = make_handler(services[1], counter, token_budget=budget)
    session = f"w-{uuid.uuid4().hex[:6]}"
    rng = random.Random(5)
    texts = [" ".join(["word"] * rng.choice([1, 5, 30, 120])) + f" #{i}" for i in range(150)]
    history = [
        {"role": "user" if i % 2 else "assistant", "content": t, "tokens": n}
        for i, (t, n) in enumerate(zip(texts, counter.count_many(texts), strict=True))
    ]
    store = redis.Redis.from_url(services[1])
    store.rpush(history_key("acme", session), *(encode_turn(t) for t in history))
    request = incoming("and now?", session)

    env = envelope(handle(handler, request))

    new_turn = {"role": "user", "content": "and now?", "tokens": counter.count("and now?")}
    system = counter.count(handler.settings.system_prompt)
    expected = compress("window", history, [new_turn], budget - system, counter)
    assert env["turns"] == expected.turns and env["turns_dropped"] == expected.turns_dropped > 32
    assert env["tokens_used"] == expected.tokens_used + system
    assert handle(handler, request) == []  # redelivered: already forwarded, nothing read or written
    assert store.llen(history_key("acme", session)) == 151

    with store.pipeline(transaction=False) as pipe:  # what the script reads for a room of 300 tokens
        HistoryWriter(60, 400).load(pipe, uuid.uuid4().hex, "acme", session, 300)
        loaded = loaded_history(pipe.execute()[0])
    assert loaded is not None and 0 < len(loaded) < 40 and loaded.skipped == 151 - len(loaded)
    everything = [*history, new_turn]
    assert list(loaded) == everything[-len(loaded) :]
    assert sum(t["tokens"] for t in everything[-len(loaded) - 1 :]) > 300 >= sum(t["tokens"] for t in loaded)


def test_an_answer_appended_before_its_question_is_claimed_still_follows_it(
    services: tuple[str, str], counter: TokenCounter
) -> None:
    """The processors append a request's own turns once its envelope is acknowledged; a
    fast worker can answer (and append its turn) in between. The history must still
    read question, answer: the answer waits for the question's claim."""
    handler = make_handler(services[1], counter)
    store = redis.Redis.from_url(services[1])
    session = f"o-{uuid.uuid4().hex[:6]}"
    answer = {"role": "assistant", "content": "an answer", "tokens": 2}
    worker_appended: list[int] = []

    async def deliver_then_worker_answers(outgoing: list[Outgoing]) -> None:
        env = envelope(outgoing)  # acknowledged; the worker reads it and answers at once
        with store.pipeline(transaction=False) as pipe:
            HistoryWriter(60, 400).append_once(pipe, env["request_id"], "acme", session, [answer])
            worker_appended.extend(pipe.execute())

    assert _runner is not None
    _runner.run(handler.handle([incoming("a question", session)], deliver_then_worker_answers))
    turns = get_codec().decode_items(
        "ContextEnvelope", "turns", [e.split(b"\t", 1)[1] for e in store.lrange(history_key("acme", session), 0, -1)]
    )
    assert worker_appended == [1]
    assert [(t["role"], t["content"]) for t in turns] == [("user", "a question"), ("assistant", "an answer")]


def test_tenants_cannot_reach_each_others_history(services: tuple[str, str], counter: TokenCounter) -> None:
    handler = make_handler(services[1], counter)
    handle(handler, incoming("secret of a", "x:y", tenant="a"))
    env = envelope(handle(handler, incoming("hello", "y", tenant="a:x")))
    assert [t["content"] for t in env["turns"]] == ["hello"]


def test_relevance_embeds_each_turn_once_and_finds_the_needle(services: tuple[str, str], counter: TokenCounter) -> None:
    handler = make_handler(services[1], counter, token_budget=256)
    session = f"rel-{uuid.uuid4().hex[:6]}"
    handle(handler, incoming("My locker code is 4812, please remember it.", session))
    for i in range(40):
        handle(handler, incoming(f"Let us talk about gardening, step {i}: water the tomatoes and weed.", session))
    env = envelope(handle(handler, incoming("What is my locker code?", session, strategy="relevance")))
    assert env["strategy"] == "relevance" and env["turns_dropped"] > 0
    assert any("4812" in t["content"] for t in env["turns"])
    cached = redis.Redis.from_url(services[1]).hlen(embeddings_key("acme", session))
    assert cached == 42  # every history turn and the question embedded once, and stored
    embedder = handler.relevance.embedder
    assert embedder is not None
    calls = []
    original = embedder.embed
    embedder.embed = lambda texts: calls.append(len(texts)) or original(texts)  # type: ignore[method-assign]
    handle(handler, incoming("And the code again?", session, strategy="relevance"))
    assert calls == [1]  # only the new question: history embeddings came from Redis


def test_cached_embeddings_shrink_with_the_history(services: tuple[str, str], counter: TokenCounter) -> None:
    handler = make_handler(services[1], counter, history_max_turns=6, token_budget=64)
    session = f"emb-{uuid.uuid4().hex[:6]}"
    for i in range(12):
        handle(handler, incoming(f"turn {i} about the garden and its many tomatoes", session, strategy="relevance"))
    stored = redis.Redis.from_url(services[1]).hlen(embeddings_key("acme", session))
    # the history holds 6 turns; the hash holds those and the latest question, not all 12
    assert stored <= 6 + 1, stored


def test_redis_outage_is_degraded_not_an_outage_and_history_resumes(counter: TokenCounter) -> None:
    port = processes.free_port()
    log_dir = Path(LOG_DIR) / "redis-outage"
    server = devstack.start_redis(port, log_dir)
    url = f"redis://127.0.0.1:{port}/0"
    handler = make_handler(url, counter)
    session = f"out-{uuid.uuid4().hex[:6]}"
    try:
        assert not envelope(handle(handler, incoming("before", session)))["degraded"]
        processes.stop_pid(server.pid)
        env = envelope(handle(handler, incoming("during", session)))
        assert env["degraded"] and [t["content"] for t in env["turns"]] == ["during"]
        server = devstack.start_redis(port, log_dir)
        handler._redis_down_until = 0.0  # skip the 1 s back-off instead of sleeping through it
        env = envelope(handle(handler, incoming("after", session)))
        assert not env["degraded"]
        assert [t["content"] for t in env["turns"]] == ["after"]  # a fresh server: history starts over
        env = envelope(handle(handler, incoming("again", session)))
        assert [t["content"] for t in env["turns"]] == ["after", "again"]  # and resumes by itself
    finally:
        processes.stop_pid(server.pid)
