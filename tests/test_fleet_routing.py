"""The processors route every request by its pools' pressure, with fallbacks
(processors/routes.py, streams/routing.py).

Two models in two pools: `smol` (budget 64, falling back to `tiny`) in pool `fast`,
`tiny` (budget 32) in pool `spare`. First the handler on a real Redis with a
hand-fed pressure board, then a processor process on the real broker, its pools'
PressureStates published here as the lag monitor would, and their contexts topics
read directly (no worker needed): a request for smol goes to fast's topic at smol's
budget; with fast full it goes to spare at tiny's budget and says so; with both full
it is answered `queue_full` with the earliest retry; an unknown model is `invalid`.
Last, the same through the Client with each pool's own worker (TIDEGATE_POOL): the
reply says which model served it and why, and with every pool full the client
refuses before sending, with the earliest retry.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from conversation.tokens import TokenCounter
from processors.handler import Incoming, RequestHandler
from processors.routes import allow_fleet_labels, pool_admission
from processors.validation import model_reason
from schemas import AVRO, content_type_header, get_codec
from streams import metrics
from streams.client import Client
from streams.config import Settings
from streams.exceptions import QueueFull
from streams.fleet import Fleet, load_fleet, parse_fleet
from streams.kafka import admin_client, producer_config
from streams.outgoing import Outgoing, now_ms
from streams.pressure import FULL, OK, PressureBoard
from streams.routing import Router
from streams.tenants import TenantPolicy, Tenants
from tests.conftest import Pipeline
from tests.handler_support import delivered
from tests.helpers import TopicReader, wait_for

FLEET = {
    "models": {"smol": {"token_budget": 64, "fallbacks": ["tiny"]}, "tiny": {"token_budget": 32}},
    "pools": {"fast": {"engine": "echo", "models": ["smol"]}, "spare": {"engine": "echo", "models": ["tiny"]}},
}
LONG = " ".join(f"word{i}" for i in range(300))  # far over either budget


def request_value(request_id: str, model: str = "", text: str = LONG, reply_to: str = "tidegate.replies") -> bytes:
    """An Avro InferenceRequest naming `model`, its own session."""
    request = {
        "request_id": request_id,
        "session_id": f"s-{request_id}",
        "tenant": "acme",
        "messages": [{"role": "user", "content": text}],
        "priority": "normal",
        "max_new_tokens": 8,
        "temperature": 0.0,
        "created_ms": 0,
        "deadline_ms": 0,
        "reply_to": reply_to,
        "strategy": "window",
        "metadata": {},
        "model": model,
        "fallbacks": [],
    }
    return get_codec().encode("InferenceRequest", request)


def pool_state(fleet: Fleet, pool: str, lag: int, level: str, rate: float) -> dict[str, Any]:
    """A pool's PressureState (v3) as the lag monitor publishes it."""
    models = [fleet.models[m] for m in fleet.pools[pool].models]
    return {
        "stage": fleet.pools[pool].stage,
        "lag": lag,
        "cap": 100,
        "state": level,
        "drain_rate": rate,
        "drain_time_ms": int(lag / rate * 1000),
        "updated_ms": now_ms(),
        "lag_seconds": 0.0,
        "lag_seconds_interpolated": 0.0,
        "health": "OK",
        "partition_health": {},
        "arrival_rate": 0.0,
        "members": 1,
        "partitions": 1,
        "pool": pool,
        "models": [
            {"id": m.id, "aliases": list(m.aliases), "token_budget": m.token_budget, "fallbacks": list(m.fallbacks)}
            for m in models
        ],
        "weight": 1.0,
        "circuit": "closed",
        "circuit_until_ms": 0,
        "probes": 0,
        "circuit_reason": "",
    }


def outputs(out: list[Outgoing]) -> list[tuple[str, dict[str, Any]]]:
    """(topic, decoded envelope or reply) per output."""
    codec = get_codec()
    return [
        (o.topic, codec.decode(o.value, "ContextEnvelope" if ".contexts" in o.topic else "InferenceReply")[1])
        for o in out
    ]


# -- the handler, on a real Redis ------------------------------------------------


def make_handler(redis_url: str, counter: TokenCounter, per_minute: int = 0) -> tuple[RequestHandler, PressureBoard]:
    settings = Settings(redis_url=redis_url, fair_shares=False)
    fleet = parse_fleet(FLEET, settings)
    allow_fleet_labels(fleet)  # as the processors do at start
    board = PressureBoard(stale_s=30, warn_ratio=0.8)
    admission, release, near_full = pool_admission(Router(fleet, board))
    tenants = Tenants(tenants={"acme": TenantPolicy(requests_per_minute=per_minute)}) if per_minute else None
    redis = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    handler = RequestHandler(settings, redis, counter, admission, None, near_full, tenants, release, fleet)
    return handler, board


def record(request_id: str, model: str = "smol") -> Incoming:
    return Incoming(request_value(request_id, model), b"k", [], "tidegate.requests", 0, 0)


def test_the_handler_routes_to_the_pool_and_budget_of_the_model_that_serves(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner
) -> None:
    handler, board = make_handler(services[1], counter)
    fleet, prefix = handler.envelopes.fleet, handler.settings.topic_prefix
    [(topic, envelope)] = outputs(delivered(runner, handler, [record("a")]))
    assert topic == f"{prefix}contexts.fast"
    assert (envelope["model"], envelope["pool"], envelope["token_budget"]) == ("smol", "fast", 64)
    assert envelope["tokens_used"] <= 64 and envelope["fallback_from"] is None

    board.publish(pool_state(fleet, "fast", 500, FULL, 10.0))
    labels = {"model": "smol", "reason": "full"}
    before = REGISTRY.get_sample_value("tidegate_fallbacks_total", labels) or 0.0
    [(topic, envelope)] = outputs(delivered(runner, handler, [record("b")]))
    assert topic == f"{prefix}contexts.spare"
    assert (envelope["model"], envelope["pool"], envelope["token_budget"]) == ("tiny", "spare", 32)
    assert (envelope["fallback_from"], envelope["fallback_reason"]) == ("smol", "full")
    assert envelope["tokens_used"] <= 32
    assert REGISTRY.get_sample_value("tidegate_fallbacks_total", labels) == before + 1

    board.publish(pool_state(fleet, "spare", 110, FULL, 100.0))  # below its exit line in 200 ms
    [(topic, reply)] = outputs(delivered(runner, handler, [record("c")]))
    assert reply["status"] == "queue_full" and "workers.spare" in reply["error"]
    assert reply["retry_after_ms"] <= 1000  # not fast's 30 s


def test_an_unknown_model_is_invalid_naming_the_served_ones_bounded(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner
) -> None:
    handler, _ = make_handler(services[1], counter)
    [(_, reply)] = outputs(delivered(runner, handler, [record("u", "gpt-5")]))
    assert reply["status"] == "invalid"
    assert reply["error"] == "unknown model 'gpt-5'; served: smol, tiny"
    crafted = {"model": "x" * 100_000, "fallbacks": []}
    reason = model_reason(crafted, handler.envelopes.fleet)
    assert reason is not None and len(reason) < 200
    assert metrics.bounded_label("model", "x" * 100_000) == metrics.OTHER  # never a label of its own
    too_many = model_reason({"model": "smol", "fallbacks": ["tiny"] * 9}, handler.envelopes.fleet)
    assert too_many == "fallbacks names 9 models, at most 8"


def test_a_request_its_quota_refuses_is_taken_back_from_the_pool_it_was_routed_to(
    services: tuple[str, str], counter: TokenCounter, runner: asyncio.Runner
) -> None:
    handler, board = make_handler(services[1], counter, per_minute=1)
    board.publish(pool_state(handler.envelopes.fleet, "fast", 500, FULL, 10.0))
    got = outputs(delivered(runner, handler, [record("q1"), record("q2")]))
    assert sorted(o.get("status", "envelope") for _, o in got) == ["envelope", "rate_limited"]
    assert board.admitted("workers.spare") == 1  # the forwarded one; the refused one was released there
    assert board.admitted("workers.fast") == 0


def test_a_wrong_fleet_file_stops_the_processors_with_one_line_per_mistake(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"models": {"smol": {}}, "pools": {"fast": {"models": ["ghost"]}}}))
    env = {**os.environ, "TIDEGATE_FLEET_FILE": str(path)}
    env.pop("TIDEGATE_METRICS_PORT", None)
    done = subprocess.run([sys.executable, "-m", "processors"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"{path}: pools.fast.engine" in done.stderr and f"{path}: pools.fast.models: 'ghost'" in done.stderr


# -- a processor process on the real broker --------------------------------------


@pytest.fixture(scope="module")
def fleet_pipeline(pipeline_factory: Callable[..., Pipeline], tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    path = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    path.write_text(yaml.safe_dump(FLEET))
    # the processor alone: this module publishes the pools' states (no monitor to overwrite
    # them), held fresh for the test's length
    pipeline = pipeline_factory(("processor",), fleet_file=str(path), model="echo", pressure_stale_s=600.0)
    fleet = load_fleet(pipeline.settings)
    wanted = [NewTopic(p.contexts_topic, num_partitions=1, replication_factor=1) for p in fleet.pools.values()]
    existing = set(admin_client(pipeline.settings).list_topics(timeout=10).topics)
    new = [topic for topic in wanted if topic.topic not in existing]
    for future in admin_client(pipeline.settings).create_topics(new).values() if new else ():
        future.result(timeout=30)
    return pipeline


class FleetClient:
    """Sends raw requests and reads what the processor made of each: an envelope on
    one of the pools' contexts topics, or a reply."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fleet = load_fleet(settings)
        self.producer = Producer(producer_config(settings))
        self.readers = {
            **{pool: TopicReader(settings, p.contexts_topic) for pool, p in self.fleet.pools.items()},
            "replies": TopicReader(settings, settings.topics.replies),
        }
        self.codec = get_codec()

    def publish(self, pool: str, lag: int, level: str, rate: float) -> None:
        state = pool_state(self.fleet, pool, lag, level, rate)
        value = self.codec.encode("PressureState", state)
        headers = [content_type_header(AVRO)]
        self.producer.produce(self.settings.topics.pressure, value, state["stage"].encode(), headers=headers)
        assert self.producer.flush(10) == 0

    def ask(self, model: str) -> tuple[str, dict[str, Any]]:
        """(pool or `replies`, the envelope or reply) for one new request."""
        request_id = uuid.uuid4().hex
        value = request_value(request_id, model, reply_to=self.settings.topics.replies)
        self.producer.produce(
            self.settings.topics.requests, value, request_id.encode(), headers=[content_type_header(AVRO)]
        )
        assert self.producer.flush(10) == 0

        def found() -> tuple[str, dict[str, Any]] | None:
            for where, reader in self.readers.items():
                schema = "InferenceReply" if where == "replies" else "ContextEnvelope"
                for message in reader.poll():
                    decoded = self.codec.decode(message.value(), schema)[1]
                    if decoded["request_id"] == request_id:
                        return where, decoded
            return None

        return wait_for(found, 30, f"the processor's output for request {request_id}")

    def ask_until(self, model: str, done: Callable[[str, dict[str, Any]], bool], what: str) -> tuple[str, dict]:
        """Asks again until an answer is `done`: the processor reads newly published
        states within a fetch, so the first requests after a publish may predate it."""
        for _ in range(40):
            where, answer = self.ask(model)
            if done(where, answer):
                return where, answer
        raise AssertionError(f"no request {what} in 40 tries")


def test_the_processor_routes_by_the_pools_published_pressure(fleet_pipeline: Pipeline) -> None:
    client = FleetClient(fleet_pipeline.settings)
    where, envelope = client.ask("smol")  # no state yet: a pool with none passes `normal`
    assert where == "fast" and (envelope["model"], envelope["pool"], envelope["token_budget"]) == ("smol", "fast", 64)
    assert envelope["tokens_used"] <= 64 and envelope["fallback_from"] is None

    client.publish("fast", 500, FULL, 10.0)
    where, envelope = client.ask_until("smol", lambda w, _: w != "fast", "routed past the full pool")
    assert where == "spare" and (envelope["model"], envelope["token_budget"]) == ("tiny", 32)
    assert (envelope["fallback_from"], envelope["fallback_reason"]) == ("smol", "full")
    assert envelope["tokens_used"] <= 32

    client.publish("spare", 110, FULL, 100.0)  # spare frees first: 200 ms; fast: 41 s (30 s at most)
    where, reply = client.ask_until("smol", lambda w, _: w == "replies", "refused")
    assert reply["status"] == "queue_full" and "workers.spare" in reply["error"]
    assert 0 < reply["retry_after_ms"] <= 2000

    where, reply = client.ask("gpt-5")
    assert where == "replies" and reply["status"] == "invalid"
    assert reply["error"] == "unknown model 'gpt-5'; served: smol, tiny"

    client.publish("spare", 0, OK, 100.0)
    client.publish("fast", 0, OK, 10.0)
    where, _ = client.ask_until("smol", lambda w, _: w == "fast", "back on its own pool")


@pytest.fixture(scope="module")
def served_pipeline(pipeline_factory: Callable[..., Pipeline], tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A processor and one worker per pool (TIDEGATE_POOL), no monitor: the pools'
    states are this module's to publish."""
    path = tmp_path_factory.mktemp("served") / "fleet.yaml"
    path.write_text(yaml.safe_dump(FLEET))
    pipeline = pipeline_factory(("processor",), fleet_file=str(path), model="echo", pressure_stale_s=600.0)
    pipeline.start(("worker",), extra_env={"TIDEGATE_POOL": "fast"})
    pipeline.start(("worker-spare",), extra_env={"TIDEGATE_POOL": "spare"})
    return pipeline


def test_through_the_client_each_reply_says_which_model_served_it_and_why(served_pipeline: Pipeline) -> None:
    settings = served_pipeline.settings
    states = FleetClient(settings)

    async def run() -> None:
        async with Client(settings=settings, tenant="acme") as client:

            async def ask() -> Any:
                hello = [{"role": "user", "content": "hello"}]
                return await client.generate(hello, uuid.uuid4().hex, model="smol", max_new_tokens=8, wait=False)

            def sees(stage: str, level: str) -> bool:
                state = client.pressure(stage)
                return state is not None and state["state"] == level

            # the client learns the fleet from the pools' states, as the monitor publishes them
            states.publish("fast", 0, OK, 10.0)
            states.publish("spare", 0, OK, 100.0)
            await asyncio.to_thread(wait_for, lambda: sees("workers.spare", OK), 10, "the client reading spare")
            reply = await ask()
            assert (reply.status, reply.model, reply.fallback_from) == ("ok", "smol", None)

            states.publish("fast", 500, FULL, 10.0)
            await asyncio.to_thread(wait_for, lambda: sees("workers.fast", FULL), 10, "the client reading fast full")
            for _ in range(40):  # the processor reads the state within a fetch
                reply = await ask()
                if reply.model != "smol":
                    break
            assert (reply.status, reply.model) == ("ok", "tiny")
            assert (reply.fallback_from, reply.fallback_reason) == ("smol", "full")

            states.publish("spare", 110, FULL, 100.0)
            await asyncio.to_thread(wait_for, lambda: sees("workers.spare", FULL), 10, "the client reading spare full")
            with pytest.raises(QueueFull) as refused:  # before anything is sent
                await ask()
            assert refused.value.stage == "workers.spare" and refused.value.retry_after_ms <= 2000

    asyncio.run(run())
