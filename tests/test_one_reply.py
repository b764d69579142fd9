"""One request, one reply from the processors (the handler on a real redis-server).

Two windows handed a caller two different replies for one request, and the client
hands over whichever copy comes first:

- a batch that failed as a whole after one of its waves was delivered: the failure
  path answered that wave's requests `error` too, beside their envelopes;
- a redelivered duplicate (forwarded and claimed before a processor crash) refused
  before its claim was read (`queue_full`, `expired`, a failed wave's `error`): the
  refusal could reach the caller before the worker's real reply.

These tests need Redis and no broker: the module starts its own redis-server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from confluent_kafka.admin import ConfigResource
from redis.asyncio import Redis

from conversation.tokens import TokenCounter
from processors.app import acknowledged_delivery, downstream_admission
from processors.handler import Incoming, RequestHandler
from schemas import get_codec
from streams import faults
from streams.config import Settings
from streams.delivery import DeliveryProducer
from streams.kafka import admin_client, producer_config
from streams.outgoing import Outgoing, now_ms
from streams.pressure import FULL, OK, PressureBoard
from streams.tenants import TenantPolicy, Tenants
from tests.conftest import LOG_DIR, SettingsFactory
from tests.handler_support import answered, pressure, request_record
from tests.helpers import TopicReader
from tidegate import devstack
from tidegate.processes import free_port, stop_pid, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.same_on_any_broker]

FLOOD = 10_000  # refusals timed by the flood test


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = devstack.start_redis(port, LOG_DIR)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_pid(server.pid)


def arm(monkeypatch: pytest.MonkeyPatch, name: str, nth: int = 1) -> None:
    """Arms the fault point `name` in this process for its `nth` reach."""
    monkeypatch.setitem(faults._ARMED, name, nth)
    monkeypatch.setitem(faults._REACHED, name, 0)


def make_handler(redis_url: str, counter: TokenCounter, board: PressureBoard | None = None) -> RequestHandler:
    settings = Settings(redis_url=redis_url, fair_shares=False)
    admission, release = downstream_admission(board) if board is not None else (None, None)
    store = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    return RequestHandler(settings, store, counter, admission, None, None, None, release)


def replies_by_request(out: list[Outgoing]) -> dict[str, list[str]]:
    """request id -> what it got, in order: `envelope` or the reply's status."""
    codec = get_codec()
    got: dict[str, list[str]] = {}
    for o in out:
        if o.topic.endswith("contexts"):
            fields, kind = codec.decode(o.value, "ContextEnvelope")[1], "envelope"
        else:
            fields = codec.decode(o.value, "InferenceReply")[1]
            kind = fields["status"]
        got.setdefault(fields["request_id"], []).append(kind)
    return got


def rid(record: Incoming) -> str:
    return get_codec().decode(record.value, "InferenceRequest")[1]["request_id"]


def test_a_batch_failing_after_a_delivered_wave_answers_only_the_requests_not_yet_answered(
    redis_url: str, counter: TokenCounter, runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    arm(monkeypatch, "processor.claim_fails")  # the first wave's claim: after its delivery
    handler = make_handler(redis_url, counter)
    session, other = f"w-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:6]}"
    first, beside, second = request_record(session, "one"), request_record(other), request_record(session, "two")
    got = replies_by_request(answered(runner, handler, [first, beside, second]))
    # the first wave (first, beside) was delivered before the failure: its envelopes only
    assert got == {rid(first): ["envelope"], rid(beside): ["envelope"], rid(second): ["error"]}


def test_a_wave_failing_after_some_of_its_requests_were_answered_answers_only_the_rest(
    redis_url: str, counter: TokenCounter, runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant's quota refuses one request of a wave, then a step for the whole wave
    fails: the refused request keeps its one `rate_limited` reply (before: it was
    answered `error` too, in the same delivery), the other is answered `error`."""
    tenant = f"q{uuid.uuid4().hex[:6]}"
    settings = Settings(redis_url=redis_url, fair_shares=False)
    tenants = Tenants(tenants={tenant: TenantPolicy(requests_per_minute=1)})
    store = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    handler = RequestHandler(settings, store, counter, None, None, None, tenants, None)
    spent = request_record(f"a-{uuid.uuid4().hex[:6]}", tenant=tenant)
    assert replies_by_request(answered(runner, handler, [spent])) == {rid(spent): ["envelope"]}
    arm(monkeypatch, "processor.wave_fails_late")
    over_session, within_session = f"b-{uuid.uuid4().hex[:6]}", f"c-{uuid.uuid4().hex[:6]}"
    over = request_record(over_session, tenant=tenant)
    within = request_record(within_session)
    # another tenant's request with the same request id (ids are the callers' own)
    other_session = f"d-{uuid.uuid4().hex[:6]}"
    same_id = request_record(other_session, tenant=f"o{tenant}", request_id=rid(over))
    codec = get_codec()
    got = sorted(
        (reply["session_id"], reply["status"])
        for reply in (
            codec.decode(o.value, "InferenceReply")[1] for o in answered(runner, handler, [over, within, same_id])
        )
    )
    # one reply each, by session: the same id under another tenant is answered, not taken for answered
    assert got == sorted([(over_session, "rate_limited"), (within_session, "error"), (other_session, "error")])


def test_a_redelivered_duplicate_is_not_refused_queue_full(
    redis_url: str, counter: TokenCounter, runner: asyncio.Runner
) -> None:
    board = PressureBoard(stale_s=30, warn_ratio=0.8)
    board.publish(pressure(OK, 0))
    handler = make_handler(redis_url, counter, board)
    forwarded = request_record(f"d-{uuid.uuid4().hex[:6]}")
    assert replies_by_request(answered(runner, handler, [forwarded])) == {rid(forwarded): ["envelope"]}
    board.publish(pressure(FULL, 500))  # the workers fell behind; then the processor crashed before its commit
    fresh = request_record(f"f-{uuid.uuid4().hex[:6]}")
    got = replies_by_request(answered(runner, handler, [forwarded, fresh]))
    # the duplicate was claimed: the worker answers it; a new request is refused as before
    assert got == {rid(fresh): ["queue_full"]}


def test_a_redelivered_duplicate_past_its_deadline_is_not_answered_expired(
    redis_url: str, counter: TokenCounter, runner: asyncio.Runner
) -> None:
    handler = make_handler(redis_url, counter)
    deadline = now_ms() + 300
    forwarded = request_record(f"e-{uuid.uuid4().hex[:6]}", deadline_ms=deadline)
    assert replies_by_request(answered(runner, handler, [forwarded])) == {rid(forwarded): ["envelope"]}
    wait_until(lambda: now_ms() > deadline, 5, "the request's deadline")
    late = request_record(f"l-{uuid.uuid4().hex[:6]}", deadline_ms=deadline)
    assert replies_by_request(answered(runner, handler, [forwarded, late])) == {rid(late): ["expired"]}


def test_a_redelivered_duplicate_in_a_failed_wave_is_not_answered_error(
    redis_url: str, counter: TokenCounter, runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = make_handler(redis_url, counter)
    forwarded = request_record(f"d-{uuid.uuid4().hex[:6]}")
    assert replies_by_request(answered(runner, handler, [forwarded])) == {rid(forwarded): ["envelope"]}
    arm(monkeypatch, "processor.wave_fails")  # before its history (and claim) is read
    fresh = request_record(f"f-{uuid.uuid4().hex[:6]}")
    assert replies_by_request(answered(runner, handler, [forwarded, fresh])) == {rid(fresh): ["error"]}


def test_a_redelivered_duplicate_in_a_failed_batch_is_not_answered_error(
    redis_url: str, counter: TokenCounter, runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = make_handler(redis_url, counter)
    forwarded = request_record(f"d-{uuid.uuid4().hex[:6]}")
    assert replies_by_request(answered(runner, handler, [forwarded])) == {rid(forwarded): ["envelope"]}
    arm(monkeypatch, "processor.batch_fails")  # before anything of the batch is delivered
    fresh = request_record(f"f-{uuid.uuid4().hex[:6]}")
    assert replies_by_request(answered(runner, handler, [forwarded, fresh])) == {rid(fresh): ["error"]}


def test_with_redis_down_a_request_past_the_cap_is_refused_as_before(
    counter: TokenCounter, runner: asyncio.Runner
) -> None:
    board = PressureBoard(stale_s=30, warn_ratio=0.8)
    board.publish(pressure(FULL, 500))
    handler = make_handler("redis://127.0.0.1:1/0", counter, board)  # nothing listens there
    records = [request_record(f"x-{uuid.uuid4().hex[:6]}") for _ in range(3)]
    assert replies_by_request(answered(runner, handler, records)) == {rid(r): ["queue_full"] for r in records}


def test_a_flood_of_refusals_costs_at_most_one_redis_round_trip_per_batch(
    redis_url: str, counter: TokenCounter, runner: asyncio.Runner
) -> None:
    """Prints the cost per refused request (compare: the same run before the claim check)."""
    board = PressureBoard(stale_s=30, warn_ratio=0.8)
    board.publish(pressure(FULL, 500))
    handler = make_handler(redis_url, counter, board)
    size = handler.settings.processor_batch
    batches = [[request_record(f"flood-{i % 50}") for i in range(size)] for _ in range(FLOOD // size + 1)]
    store = redis.Redis.from_url(redis_url)
    calls_before = _round_trips(store)
    started = time.perf_counter()
    refused = sum(len(answered(runner, handler, batch)) for batch in batches)
    elapsed = time.perf_counter() - started
    round_trips = _round_trips(store) - calls_before
    print(
        f"\n{refused} refusals in {elapsed:.2f} s: {elapsed / refused * 1e6:.0f} us each, {round_trips} Redis scripts"
    )
    assert refused == len(batches) * size
    assert round_trips <= len(batches)


def _round_trips(store: redis.Redis) -> int:
    """Scripts Redis has run so far: the handler's every call to Redis is one (the
    commands a script runs are counted apart, under their own names)."""
    stats = store.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_eval", "cmdstat_evalsha"))


def test_an_envelope_the_broker_refuses_for_good_is_answered_error_and_the_stage_goes_on(
    settings_factory: SettingsFactory, counter: TokenCounter, runner: asyncio.Runner
) -> None:
    """Before, an envelope had no fallback: the broker's refusal (too large for the
    contexts topic, say) sent the whole batch again forever, its caller got nothing
    and neither did any later request of the partition."""
    settings = settings_factory()
    contexts = ConfigResource(ConfigResource.Type.TOPIC, settings.topics.contexts, {"max.message.bytes": "1500"})
    admin = admin_client(settings)  # kept until its answer: a dropped client cancels it
    for future in admin.alter_configs([contexts]).values():
        future.result(timeout=10)
    store = Redis.from_url(settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
    handler = RequestHandler(settings, store, counter)
    delivery = DeliveryProducer(producer_config(settings))
    deliver = acknowledged_delivery(delivery)
    words = " ".join(f"word{i}" for i in range(600))  # an envelope of about 4 KB
    to = settings.topics.replies
    large = request_record(f"big-{uuid.uuid4().hex[:6]}", words, reply_to=to)
    small = request_record(f"s-{uuid.uuid4().hex[:6]}", reply_to=to)
    replies, envelopes = TopicReader(settings, settings.topics.replies), TopicReader(settings, settings.topics.contexts)
    try:
        for batch in ([large], [small]):
            runner.run(asyncio.wait_for(handler.answer(batch, deliver), 30))
        reply = replies.wait(lambda got: len(got) >= 1, 10, "the large request's reply")[0]
        fields = get_codec().decode(reply.value(), "InferenceReply")[1]
        assert (fields["request_id"], fields["status"]) == (rid(large), "error")
        assert "refused" in fields["error"]
        forwarded = envelopes.wait(lambda got: len(got) >= 1, 10, "the small request's envelope")
        assert [get_codec().decode(m.value(), "ContextEnvelope")[1]["request_id"] for m in forwarded] == [rid(small)]
    finally:
        replies.close()
        envelopes.close()
        delivery.close()
