"""A pool whose engine is a remote OpenAI-compatible server (issue 27, items 1-3), on the
real broker, no stubs: the provider is a second tidegate stack (the `tiny` model) behind
its own HTTP gateway on loopback, whose 429s are its own: `queue_full` past its small
workers' cap, and `rate_limit_exceeded` for a tenant over its requests per minute.

The fleet under test serves one model, `smol`, from a local pool (a simulated
accelerator) and a remote pool of two workers calling the provider. It shows:

- both pools serve the model; the remote pool's replies carry the provider's usage;
  streamed requests stream through the remote pool; the provider's 429s pause the
  remote pool and every request is answered exactly once, none lost;
- with its key switched to a tenant the provider holds to a few requests a minute, a
  429 pauses both workers of the pool together (one told by the provider, the other
  by the pause record on the pressure topic), a caller whose model has no other pool
  with room is told `queue_full` with a retry time that is the provider's wait, and
  the refused request is sent again after the wait and answered once, in time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from confluent_kafka import Producer

from conversation.history import cancel_key
from gateway.keys import digest, new_key
from inference.session_store import STATS_KEY
from schemas import AVRO, content_type_header, get_codec
from streams import Client, QueueFull
from streams.config import Settings
from streams.kafka import connection_config
from streams.outgoing import now_ms
from streams.pauses import Pause
from streams.pressure_feed import PressureListener
from tests.conftest import LOG_DIR, Pipeline, settings_env
from tests.helpers import TopicReader, wait_for
from tests.hostile import envelope
from tidegate.processes import free_port, spawn, stop_pid, wait_listening

pytestmark = [pytest.mark.integration, pytest.mark.same_on_any_broker, pytest.mark.timeout(420)]

KEY_ENV = "TIDEGATE_TEST_PROVIDER_KEY"  # the variable the fleet file names: the key is never in it
PROVIDER_CAP = 2  # the provider's workers' cap: a few requests in flight past it are refused 429
METERED_RPM = 10  # the metered tenant's requests per minute at the provider: one every 6 s past its burst
MAX_IN_FLIGHT = 4
REMOTE = "workers.remote"
FLEET = """
models:
  smol: {{token_budget: 512}}
  big: {{token_budget: 512}}  # served by the remote pool alone
pools:
  local: {{engine: "sim:20", models: [smol], partitions: 2, workers_cap_messages: 500}}
  remote:
    engine: openai
    base_url: {base_url}
    api_key_env: {key_env}
    provider_model: tiny
    max_in_flight: {max_in_flight}
    models: [smol, big]
    partitions: 4
    replicas: 2
    workers_cap_messages: 500
"""
REMOTE_WORKERS = ("worker-remote1", "worker-remote2")


class ProviderGateway:
    """`python -m gateway` of the provider's stack with one API key per tenant."""

    def __init__(self, settings: Settings, tenants: list[str]) -> None:
        self.keys = {tenant: new_key() for tenant in tenants}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        folder = LOG_DIR / f"provider-gateway-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True, exist_ok=True)
        keys = folder / "keys.yaml"
        keys.write_text("".join(f"{digest(key)}: {tenant}\n" for tenant, key in self.keys.items()))
        env = {**os.environ, **settings_env(settings)}
        cmd = [sys.executable, "-m", "gateway", "--port", str(self.port), "--api-keys", str(keys)]
        self.proc: subprocess.Popen[bytes] = spawn(cmd, folder / "gateway.log", env)
        wait_listening(self.proc, self.port, "the provider's gateway", folder / "gateway.log", 30)

    def refused(self) -> int:
        """The 429s it answered so far (its Prometheus text)."""
        return self._counter('tidegate_gateway_requests_total{code="429"}')

    def cancelled(self) -> int:
        """Requests it cancelled because their HTTP caller went away."""
        return self._counter("tidegate_gateway_cancelled_total")

    def _counter(self, name: str) -> int:
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics").text
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith(name))

    def stop(self) -> None:
        stop_pid(self.proc.pid)


@dataclass
class Stacks:
    provider: Pipeline
    gateway: ProviderGateway
    fast: str  # tenants at the provider: unlimited, and held to METERED_RPM
    metered: str
    fleet: Pipeline


@pytest.fixture(scope="module")
def stacks(pipeline_factory: Callable[..., Pipeline], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stacks]:
    folder = Path(tmp_path_factory.mktemp("remote"))
    tag = uuid.uuid4().hex[:6]
    fast, metered = f"fast-{tag}", f"metered-{tag}"  # Redis is shared: quotas are per tenant name
    tenants = folder / "tenants.yaml"
    tenants.write_text(f"tenants:\n  {metered}: {{requests_per_minute: {METERED_RPM}}}\n")
    provider = pipeline_factory(
        model="tiny", torch_threads=1, workers_cap_messages=PROVIDER_CAP, tenants_file=str(tenants)
    )
    gateway = ProviderGateway(provider.settings, [fast, metered])
    fleet_file = folder / "fleet.yaml"
    fleet_file.write_text(FLEET.format(base_url=gateway.base_url, key_env=KEY_ENV, max_in_flight=MAX_IN_FLIGHT))
    fleet = pipeline_factory(
        roles=(),
        fleet_file=str(fleet_file),
        circuit_open_s=30.0,  # the local pool, stopped, stays open past the provider's wait
        circuit_open_max_s=60.0,
    )
    fleet.start(("monitor", "processor"))
    fleet.start(("worker-local",), extra_env={"TIDEGATE_POOL": "local"})
    fleet.start(REMOTE_WORKERS, extra_env={"TIDEGATE_POOL": "remote", KEY_ENV: gateway.keys[fast]})
    wait_members(fleet.settings, {"workers.local": 1, REMOTE: 2})
    try:
        yield Stacks(provider, gateway, fast, metered, fleet)
    finally:
        gateway.stop()


def wait_members(settings: Settings, members: dict[str, int], timeout_s: float = 30) -> None:
    """Until the pools' states count their workers: a pool read without members is
    routed to last (streams/routing.py)."""
    watch = PressureListener(settings)
    watch.start()
    try:
        wait_for(
            lambda: all((watch.board.state(s) or {}).get("members") == n for s, n in members.items()),
            timeout_s,
            f"the pools' members {members}",
        )
    finally:
        watch.close()


def remote_stats(pipeline: Pipeline) -> list[dict[str, str]]:
    """The remote workers' counters (inference/remote.py RemoteStats) as they published
    them, of the workers running now."""
    client = redis.Redis.from_url(pipeline.settings.redis_url, decode_responses=True)
    prefix = f"{STATS_KEY}{pipeline.settings.topic_prefix}{socket.gethostname()}:"
    return [client.hgetall(f"{prefix}{pipeline.pids[role]}") for role in REMOTE_WORKERS]


def replies_on(settings: Settings, topic: str) -> collections.Counter[str]:
    """Replies (not chunks) per request id on `topic`."""
    reader = TopicReader(settings, topic)
    try:
        counts: collections.Counter[str] = collections.Counter()
        for m in reader.poll():
            name, record = get_codec().decode(m.value())
            if name == "InferenceReply":
                counts[record["request_id"]] += 1
        return counts
    finally:
        reader.close()


def ids_on(settings: Settings, topic: str) -> set[str]:
    """The request ids of the envelopes routed to a pool's contexts topic."""
    reader = TopicReader(settings, topic)
    try:
        return {get_codec().decode(m.value(), "ContextEnvelope")[1]["request_id"] for m in reader.poll()}
    finally:
        reader.close()


def test_a_local_and_a_remote_pool_serve_one_model_and_the_providers_429s_pause_the_remote_one(
    stacks: Stacks,
) -> None:
    settings = stacks.fleet.settings
    refused_before = stacks.gateway.refused()

    async def load() -> tuple[list[Any], list[list[Any]], str]:
        async with Client(settings=settings) as client:
            asked = [
                client.generate(
                    [{"role": "user", "content": f"question {i}"}],
                    f"s-{i}",
                    model="smol",
                    max_new_tokens=8,
                    deadline_s=90,
                    wait=True,
                )
                for i in range(32)
            ]

            async def streamed(i: int) -> list[Any]:
                chunks = client.stream(
                    [{"role": "user", "content": f"stream {i}"}],
                    f"st-{i}",
                    model="smol",
                    max_new_tokens=12,
                    deadline_s=90,
                )
                return [c async for c in chunks]

            results = await asyncio.gather(*asked, *(streamed(i) for i in range(8)))
            return list(results[:32]), list(results[32:]), client.reply_topic

    replies, streams, reply_topic = asyncio.run(load())
    assert [r.status for r in replies] == ["ok"] * 32, [(r.status, r.error) for r in replies if r.status != "ok"]
    for chunks in streams:
        final = chunks[-1].reply
        assert final is not None and final.status == "ok", final
        assert "".join(c.text for c in chunks) == final.text
    ids = {r.request_id for r in replies} | {c[-1].reply.request_id for c in streams}
    local, remote = (
        ids_on(settings, f"{settings.topics.contexts}.local"),
        ids_on(settings, f"{settings.topics.contexts}.remote"),
    )
    assert local and remote and not local & remote, (len(local), len(remote))
    assert ids <= local | remote  # (a request sent again after queue_full is routed again: still one pool)
    by_id = {r.request_id: r for r in replies}
    # the provider's usage in the reply: the tiny model counts its prompt; the simulated local pool does not
    assert all(by_id[i].tokens_in > 0 for i in remote & set(by_id)), "remote replies carry the provider's usage"
    assert all(by_id[i].tokens_in == 0 for i in local & set(by_id))
    answered = replies_on(settings, reply_topic)
    assert {i: answered[i] for i in ids} == dict.fromkeys(ids, 1), "each request answered exactly once"
    loaded_ms = now_ms()
    stats = wait_for(
        lambda: (
            (got := remote_stats(stacks.fleet)) and all(int(s.get("updated_ms", 0)) > loaded_ms for s in got) and got
        ),
        10,
        "the remote workers' stats after the load",
    )
    rate_limited = sum(int(s["rate_limited"]) for s in stats)
    assert stacks.gateway.refused() - refused_before >= rate_limited > 0, stats
    assert sum(int(s["pauses_own"]) + int(s["pauses_joined"]) for s in stats) > 0
    # the key is read from the variable the fleet file names, and written nowhere
    key = stacks.gateway.keys[stacks.fast]
    assert not [p.name for p in stacks.fleet.log_dir.glob("*.log") if key in p.read_text(errors="replace")]
    print("REMOTE", {"local": len(local), "remote": len(remote), "stats": stats})


def test_a_caller_who_cancels_is_cancelled_at_the_provider(stacks: Stacks) -> None:
    """The caller goes away mid-stream (its cancel key, as the gateway sets it): the call
    to the provider is closed, which the provider's own gateway counts as a caller gone,
    and the request is answered `expired`, once."""
    settings = stacks.fleet.settings
    cancelled_before = stacks.gateway.cancelled()
    store = redis.Redis.from_url(settings.redis_url)

    async def cancel_midway() -> list[Any]:
        async with Client(settings=settings, tenant="acme") as client:
            chunks = client.stream(
                [{"role": "user", "content": "tell me a long story"}],
                "c-1",
                model="big",
                max_new_tokens=1000,
                deadline_s=60,
            )
            got = [await anext(chunks)]  # text is coming from the provider
            store.set(cancel_key("acme", got[0].request_id), 1, ex=60)
            got += [c async for c in chunks]
            return got

    got = asyncio.run(cancel_midway())
    final = got[-1].reply
    assert final is not None and final.status == "expired", final
    assert (final.error or "").startswith("cancelled by the caller after"), final.error
    assert final.tokens_out < 1000
    wait_for(lambda: stacks.gateway.cancelled() > cancelled_before, 15, "the provider to see its caller go away")


def test_a_providers_rate_limit_pauses_both_workers_and_a_caller_is_told_the_providers_wait(stacks: Stacks) -> None:
    settings = stacks.fleet.settings
    # the local pool: its worker stopped with requests waiting in it, its circuit opens
    # (no members): no other pool of the model has room
    stacks.fleet.stop(("worker-local",))
    producer = Producer(connection_config(settings))
    queued = [f"q-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for request_id in queued:
        record = envelope(settings, request_id, version=4, model="smol", pool="local")
        producer.produce(
            f"{settings.topics.contexts}.local",
            get_codec().encode("ContextEnvelope", record),
            request_id.encode(),
            headers=[content_type_header(AVRO)],
        )
    assert producer.flush(10) == 0
    watch = PressureListener(settings)
    watch.start()
    try:
        wait_for(
            lambda: (watch.board.state("workers.local") or {}).get("circuit") == "open",
            40,
            "the local pool's circuit to open",
        )
        # the remote pool's workers on the key of a tenant the provider holds to METERED_RPM
        stacks.fleet.stop(REMOTE_WORKERS)
        stacks.fleet.start(
            REMOTE_WORKERS, extra_env={"TIDEGATE_POOL": "remote", KEY_ENV: stacks.gateway.keys[stacks.metered]}
        )
        wait_members(settings, {REMOTE: 2})
        refused_before = stacks.gateway.refused()
        replies, refusal, pause, told_at, reply_topic = asyncio.run(burst(settings, watch))
    finally:
        watch.close()
    # told queue_full at the remote pool, with the provider's wait as the retry time
    assert refusal.stage == REMOTE, refusal
    left_ms = pause.until_ms - told_at
    assert abs(refusal.retry_after_ms - left_ms) <= 300, (refusal.retry_after_ms, left_ms, pause)
    assert "429" in pause.reason and "retry-after" in pause.reason, pause
    # every request answered ok, once, the refused ones after the provider's wait
    assert [r.status for r in replies] == ["ok"] * len(replies), [(r.status, r.error) for r in replies]
    ids = {r.request_id for r in replies}
    answered = replies_on(settings, reply_topic)
    assert {i: answered[i] for i in ids} == dict.fromkeys(ids, 1), "each request answered exactly once"
    assert max(r.timings.total_ms for r in replies) >= left_ms
    # both workers stopped for the long wait: one told by the provider, the other by the pause record
    long_ms = pause.until_ms - pause.updated_ms

    def paused_through() -> list[dict[str, str]] | None:
        stats = remote_stats(stacks.fleet)
        fresh = all(int(s.get("updated_ms", 0)) > pause.until_ms for s in stats)
        return stats if fresh and all(int(s["paused_ms"]) >= 0.8 * long_ms for s in stats) else None

    stats = wait_for(paused_through, 20, "both remote workers' stats to show the provider's pause")
    assert sum(int(s["pauses_joined"]) for s in stats) >= 1, stats
    assert sum(int(s["rate_limited"]) for s in stats) <= stacks.gateway.refused() - refused_before
    # the local pool's worker back: what waited in it is answered, none lost
    stacks.fleet.start(("worker-local",), extra_env={"TIDEGATE_POOL": "local"})
    reader = TopicReader(settings, settings.topics.replies)
    try:
        reader.wait(
            lambda ms: set(queued) <= {(m.key() or b"").decode() for m in ms}, 60, "the local pool's queued replies"
        )
    finally:
        reader.close()
    print("REMOTE-PAUSE", {"retry_after_ms": refusal.retry_after_ms, "left_ms": left_ms, "stats": stats})


async def burst(settings: Settings, watch: PressureListener) -> tuple[list[Any], QueueFull, Pause, int, str]:
    """More requests than the provider's tenant may send this minute; once the pool is
    paused for its provider's wait, a caller's pre-send check."""
    async with Client(settings=settings) as client:
        asked = [
            asyncio.ensure_future(
                client.generate(
                    [{"role": "user", "content": f"metered {i}"}],
                    f"m-{i}",
                    model="smol",
                    max_new_tokens=8,
                    deadline_s=120,
                )
            )
            for i in range(METERED_RPM + 3)
        ]
        deadline = time.monotonic() + 60
        while True:
            pause = watch.board.pauses.current("remote")
            if pause is not None and pause.until_ms - now_ms() > 2000:  # the quota's wait, not a queue_full's
                try:
                    client.check_pressure(model="smol")
                except QueueFull as exc:
                    refusal, told_at = exc, now_ms()
                    pause = watch.board.pauses.current("remote") or pause
                    break
            assert time.monotonic() < deadline, "no long pause of the remote pool within 60 s"
            await asyncio.sleep(0.02)
        return list(await asyncio.gather(*asked)), refusal, pause, told_at, client.reply_topic
