"""`tidegate bench provider`: a remote pool in front of a rate-limited provider (issue 27,
item 5), on Apache Kafka, loopback only.

The provider is a second tidegate stack on the bench stack's broker and Redis (its own
topic prefix and groups: one JVM on this machine, not two) with the `echo` model and
its OpenAI-compatible gateway: one tenant, the bench's API key, held to R requests a
minute by its quota (processors/quotas.py) and answered 429 `rate_limit_exceeded`
past it, with `retry-after-ms`, `retry-after` and `x-ratelimit-*` (gateway/app.py).
Its backpressure is off, so the quota is its only limit. The quota's GCRA lets a
minute's requests pass at once; before each run that minute is spent through the
quota script itself (as if the account's other traffic had spent it), so over the
run the provider admits R a minute and no more: goodput against R is a fair ratio,
and a pool that sends faster than R meets 429s at once, as at a provider that
enforces its limit over seconds.

The fleet serves one model, `chat`, from one remote pool (`engine: openai`, two
workers, MAX_IN_FLIGHT each, the pool's `rpm` as `run` is given it). Each run starts
the pool's two workers afresh (SHARED_POOL_PAUSES on, or off: the baseline, each
worker discovering the provider's 429s alone), spends the provider's minute, offers
FACTOR x R through the Python client, open loop, for OFFER_S (a QueueFull before
sending is refused, not lost: bench/fleet.py), awaits every reply, reads the client's
reply topic for request ids answered twice, and reads the provider's counts of the
calls it answered (its gateway's Prometheus text) and the workers' own counters
(inference/remote.py RemoteStats). Figures: bench/provider_summary.py.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from redis.asyncio import Redis

from bench.fleet import LOG_ROOT, _described, _open_loop, machine
from bench.fleet_summary import Outcome
from bench.overload import _as_control_plane
from bench.provider_summary import calls_between, format_run, provider_fleet, run_summary, status_codes, worker_totals
from gateway.keys import digest, new_key
from inference.session_store import STATS_KEY
from processors.quotas import Quotas
from schemas import get_codec
from streams.client import Client
from streams.config import Settings
from streams.kafka import connection_config, create_topics
from streams.lifecycle import READY_MARKER
from streams.pressure_feed import PressureListener
from streams.tenants import Tenants
from tidegate import devstack
from tidegate.processes import free_port, spawn, stop_pid, wait_listening, wait_until
from tidegate.supervisor import Plan, pool_role

R_PER_MINUTE = 600  # the provider's limit: 10 requests/s
FACTOR = 3.0
OFFER_S, SETTLE_S = 60.0, 5.0  # goodput over [SETTLE_S, OFFER_S] of the offered load
DEADLINE_S = 10.0
REPLY_GRACE_S = 20.0  # past the deadline a reply is still awaited: later is `lost`
WORKERS = 2
MAX_IN_FLIGHT = 8
CAP_MESSAGES = 40  # the remote pool's cap: 4 s of the provider's pace queued at most
POOL = "remote"
STAGE = f"workers.{POOL}"  # its key on the pressure topic
KEY_ENV = "TIDEGATE_BENCH_PROVIDER_KEY"  # the variable the fleet file names: the key is never in it
TENANT = "bench-provider"  # the provider's tenant the key is of
PROVIDER_MODEL = "echo"
MODES = {"shared": True, "alone": False}  # SHARED_POOL_PAUSES of a run's workers
LOG_DIR = LOG_ROOT / "provider"
ENV = {"TIDEGATE_RESPONSE_CACHE_TTL_S": "0"}  # every request a call to the provider
START_S = 120.0  # the longest wait for a process to say it is ready


@dataclass
class ProviderStack:
    """The provider: a processor, an `echo` worker and the HTTP gateway of a stack of
    its own topics, on the bench stack's broker and Redis."""

    settings: Settings
    base_url: str
    key: str
    procs: list[subprocess.Popen[bytes]]

    def codes(self) -> dict[str, int]:
        """The chat completions its gateway answered so far, per status code."""
        return status_codes(httpx.get(f"{self.base_url.removesuffix('/v1')}/metrics", timeout=10).text)

    async def spend_minute(self, rpm: int) -> int:
        """Spends the tenant's quota through the quota script (what the processors run):
        the provider admits R a minute from now on, none ahead. Returns the requests'
        worth it took (R from a full bucket)."""
        client = Redis.from_url(self.settings.redis_url)
        try:
            decisions = await Quotas(client, Tenants.load(self.settings)).decide([(TENANT, 0)] * rpm)
        finally:
            await client.aclose()
        return sum(1 for d in decisions if d is not None and d.passed)

    def stop(self) -> None:
        _stop_all(self.procs)


def start_provider(stack: devstack.DevStack, port: int, rpm: int, log_dir: Path) -> ProviderStack:
    """The provider stack on `stack`'s broker and Redis, its gateway on 127.0.0.1:`port`,
    ready and called once (its tenant's client started)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    key = new_key()
    keys = log_dir / "keys.yaml"
    keys.write_text(f"{digest(key)}: {TENANT}\n")  # only the key's digest is written
    tenants = log_dir / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": {TENANT: {"requests_per_minute": rpm}}}))
    env = {
        "TIDEGATE_BOOTSTRAP": stack.bootstrap,
        "TIDEGATE_REDIS_URL": stack.redis_url,
        "TIDEGATE_BROKER": stack.broker,
        "TIDEGATE_TOPIC_PREFIX": "provider.",
        "TIDEGATE_PROCESSOR_GROUP": "provider-processors",
        "TIDEGATE_WORKER_GROUP": "provider-workers",
        "TIDEGATE_MODEL": PROVIDER_MODEL,
        "TIDEGATE_TENANTS_FILE": str(tenants),
        "TIDEGATE_RESPONSE_CACHE_TTL_S": "0",
        "TIDEGATE_BACKPRESSURE": "false",  # its quota is its only limit
    }
    settings = Settings(**{k.removeprefix("TIDEGATE_").lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    create_topics(settings)
    base_url = f"http://127.0.0.1:{port}/v1"
    provider = ProviderStack(settings, base_url, key, [])
    try:
        for module, name in (("processors", "processors"), ("inference", "inference")):
            provider.procs.append(devstack.start_stage(module, env, log_dir, name=name))
        for proc, name in zip(provider.procs, ("processors", "inference"), strict=True):
            devstack.wait_for_ready(log_dir / f"{name}.log", READY_MARKER, proc, START_S)
        cmd = [sys.executable, "-m", "gateway", "--port", str(port), "--api-keys", str(keys)]
        provider.procs.append(spawn(cmd, log_dir / "gateway.log", env))
        wait_listening(provider.procs[-1], port, "the provider's gateway", log_dir / "gateway.log", 30)
        body = {"model": PROVIDER_MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        answer = httpx.post(
            f"{base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60
        )
        answer.raise_for_status()
    except BaseException:
        provider.stop()
        raise
    return provider


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stops them at once (each finishes what it holds: seconds)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, len(procs))) as pool:
        list(pool.map(lambda p: stop_pid(p.pid), procs))


def start_workers(stack: devstack.DevStack, key: str, shared: bool, run: str) -> list[subprocess.Popen[bytes]]:
    """The remote pool's WORKERS workers, started as the supervisor starts one (its plan's
    env, the pool's role, a metrics port) with the provider's key and SHARED_POOL_PAUSES
    as `shared`; returns once they are ready and the pool's state counts them."""
    plan = Plan.load(Path(stack.log_dir) / "supervisor-plan.json")
    procs, names = [], []
    for i in range(WORKERS):
        stage = plan.stage(pool_role(POOL), f"inference.{POOL}-{run}-{i + 1}")
        env = {
            **plan.env,
            **stage.env,
            "TIDEGATE_METRICS_PORT": str(stage.metrics_port),
            "TIDEGATE_SHARED_POOL_PAUSES": str(shared).lower(),
            KEY_ENV: key,
        }
        procs.append(devstack.start_stage(stage.module, env, Path(stack.log_dir), stage.nice, stage.name))
        names.append(stage.name)
    try:
        for proc, name in zip(procs, names, strict=True):
            devstack.wait_for_ready(Path(stack.log_dir) / f"{name}.log", READY_MARKER, proc, START_S)
        _wait_members(_settings(stack), WORKERS)
    except BaseException:
        _stop_all(procs)
        raise
    return procs


def _wait_members(settings: Settings, members: int, timeout_s: float = 60) -> None:
    """Until the pool's state counts `members` workers: its workers pace themselves to
    their share of its rpm by that count (inference/remote_worker.py `_share`)."""
    watch = PressureListener(settings)
    watch.start()
    try:
        wait_until(
            lambda: (watch.board.state(STAGE) or {}).get("members") == members,
            timeout_s,
            f"the remote pool's state to count {members} workers",
            0.1,
        )
    finally:
        watch.close()


def replies_per_id(settings: Settings, topic: str, timeout_s: float = 30) -> collections.Counter[str]:
    """Replies (not chunks) per request id on `topic`, read from its beginning to its end."""
    consumer = Consumer(
        {
            **connection_config(settings),
            "group.id": f"tidegate-client-bench-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    counts: collections.Counter[str] = collections.Counter()
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        ended: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(ended) < len(partitions):
            if time.monotonic() > deadline:
                raise devstack.DevStackError(f"{topic} not read to its end within {timeout_s:.0f}s")
            for m in consumer.consume(500, 0.2):
                error = m.error()
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    ended.add(m.partition())
                elif error is not None:
                    raise devstack.DevStackError(f"reading {topic}: {error}")
                else:
                    name, record = get_codec().decode(m.value())
                    if name == "InferenceReply":
                        counts[record["request_id"]] += 1
    finally:
        consumer.close()
    return counts


def worker_stats(settings: Settings, procs: list[subprocess.Popen[bytes]], after_ms: int) -> list[dict[str, str]]:
    """The remote workers' counters as they published them after `after_ms` (once a
    second), or the last ones they published."""
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    keys = [f"{STATS_KEY}{settings.topic_prefix}{socket.gethostname()}:{p.pid}" for p in procs]
    found: list[dict[str, str]] = []

    def fresh() -> bool:
        found[:] = [client.hgetall(k) for k in keys]
        return all(int(s.get("updated_ms", 0)) > after_ms for s in found)

    try:
        wait_until(fresh, 10, "the remote workers' stats", 0.2)
    except devstack.DevStackError as exc:
        print(f"  {exc}: the last ones published")
    return found


def _settings(stack: devstack.DevStack) -> Settings:
    return Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, broker="kafka")


def one_run(
    stack: devstack.DevStack, provider: ProviderStack, mode: str, provider_rpm: int, offer_s: float
) -> dict[str, Any]:
    """One run of the load with the pool's workers started afresh in `mode`."""
    settings = _settings(stack)
    procs = start_workers(stack, provider.key, MODES[mode], mode)
    rate = FACTOR * provider_rpm / 60
    try:

        async def offer() -> tuple[list[Outcome], float, int, collections.Counter[str], int, dict[str, int]]:
            outcomes: list[Outcome] = []
            async with Client(settings=settings, reply_grace_s=REPLY_GRACE_S) as client:
                spent = await provider.spend_minute(provider_rpm)  # the client started: the load begins now
                before = await asyncio.to_thread(provider.codes)
                t0, sent = await _open_loop(client, mode, rate, offer_s, outcomes, "chat", deadline_s=DEADLINE_S)
                counts = await asyncio.to_thread(replies_per_id, settings, client.reply_topic)
            return outcomes, t0, sent, counts, spent, before

        print(f"== provider / {mode}: {rate:g}/s offered for {offer_s:g} s, the provider at {provider_rpm}/min")
        outcomes, t0, sent, counts, spent, before = _as_control_plane(
            settings.control_plane_nice, lambda: asyncio.run(offer())
        )
        calls = calls_between(before, provider.codes())
        stats = worker_stats(settings, procs, int(time.time() * 1000))
    finally:
        _stop_all(procs)
    window = (t0 + SETTLE_S, t0 + offer_s)
    summary = run_summary(outcomes, sent, window, provider_rpm, calls, counts, DEADLINE_S)
    result = {"offered_rps": rate, "provider_minute_spent": spent} | summary | {"workers": worker_totals(stats)}
    print("  " + format_run(mode, result))
    print(f"  the workers' own counts: {result['workers']}")
    return _described(result)


def run(
    pool_rpm: int | None = R_PER_MINUTE,
    modes: tuple[str, ...] = tuple(MODES),
    provider_rpm: int = R_PER_MINUTE,
    offer_s: float = OFFER_S,
) -> dict[str, Any]:
    """Both runs on one stack and one provider: the shared pause, then each worker alone.
    `pool_rpm`: the remote pool's `rpm` in its fleet file (None: none, the 429s alone)."""
    started = time.monotonic()
    results: dict[str, Any] = {"benchmark": "provider", "broker": "kafka", "machine": machine()}
    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    fleet_path = LOG_DIR / "fleet.yaml"
    fleet = provider_fleet(
        f"http://127.0.0.1:{port}/v1", KEY_ENV, PROVIDER_MODEL, MAX_IN_FLIGHT, pool_rpm, CAP_MESSAGES
    )
    fleet_path.write_text(fleet)
    print(f"== provider: a fresh stack on Apache Kafka, fleet file {fleet_path}")
    stack = devstack.up(model="echo", log_dir=LOG_DIR, extra_env=ENV, broker="kafka", fleet_file=fleet_path)
    try:
        provider = start_provider(stack, port, provider_rpm, LOG_DIR / "provider-stack")
        try:
            results["setup"] = {
                "provider": {"model": PROVIDER_MODEL, "rpm": provider_rpm, "tenant_quota": True},
                "pool": {"workers": WORKERS, "max_in_flight": MAX_IN_FLIGHT, "rpm": pool_rpm, "cap": CAP_MESSAGES},
                "offered_rps": FACTOR * provider_rpm / 60,
                "offer_s": offer_s,
                "deadline_s": DEADLINE_S,
            }
            results["runs"] = {mode: one_run(stack, provider, mode, provider_rpm, offer_s) for mode in modes}
        finally:
            provider.stop()
    finally:
        stack.stop()
    results["wall_s"] = round(time.monotonic() - started, 1)
    return results
