"""Test helpers: bounded waits and reading whole topics from the real broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from gateway.keys import digest, new_key
from streams import Client, QueueFull, Reply, ReplyTimeout
from streams.config import Settings
from streams.kafka import connection_config
from streams.lag import LagReader, pipeline_stages
from tests.conftest import LOG_DIR, settings_env
from tidegate.processes import free_port, spawn, stop_pid, wait_listening


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Returns check()'s first truthy value; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def wait_for_stage_lag(settings: Settings, stage_name: str, expected: int, timeout_s: float) -> None:
    """Waits until a pipeline stage's lag (log end - committed) is `expected`."""
    stage = next(s for s in pipeline_stages(settings) if s.name == stage_name)
    reader = LagReader(settings, [stage])
    try:

        def lag_now() -> int:
            reader.poll(0.1)
            return reader.lag(stage).lag

        wait_for(lambda: lag_now() == expected, timeout_s, f"{stage_name}' lag == {expected}")
    finally:
        reader.close()


class TopicReader:
    """Reads a topic from the beginning, all partitions, without a group join."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.messages: list[Any] = []
        self._consumer = Consumer(
            {
                **connection_config(settings),
                "group.id": f"tidegate-client-reader-{time.monotonic_ns()}",  # a group a tenant may use
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 25,
            }
        )
        meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])

    def poll(self) -> list[Any]:
        for m in self._consumer.consume(1000, 0.1):
            if m.error() is None:
                self.messages.append(m)
            elif m.error().code() != KafkaError._PARTITION_EOF:
                raise AssertionError(str(m.error()))
        return self.messages

    def wait(self, predicate: Callable[[list[Any]], bool], timeout_s: float, what: str) -> list[Any]:
        wait_for(lambda: predicate(self.poll()), timeout_s, what)
        return self.messages

    def close(self) -> None:
        self._consumer.close()


@dataclass
class Outcome:
    """One request of an offered load: its reply (None: lost) and when it came."""

    text: str
    reply: Reply | None
    done_at: float
    sent_at: float = 0.0


async def offer_load(
    client: Client,
    tag: str,
    seconds: float,
    rate_per_s: float,
    deadline_s: float = 120,
    wait: bool = False,
    sessions: int = 64,
) -> list[Outcome]:
    """`rate_per_s` echo requests a second for `seconds` (bounded), each awaited to its
    reply (with `wait`, retrying past QueueFull until the deadline); a request with no
    reply by its deadline is an Outcome with reply None. The requests take turns in
    `sessions` conversations, whose histories grow (prompts up to the context budget);
    `sessions=0` gives each request its own, so every prompt stays short."""

    async def one(i: int) -> Outcome:
        text = f"{tag} {i}"
        sent_at = time.monotonic()
        try:
            reply = await client.generate(
                [{"role": "user", "content": text}],
                f"{tag}-{i % sessions if sessions else i}",
                max_new_tokens=8,
                deadline_s=deadline_s,
                wait=wait,
            )
        except (ReplyTimeout, QueueFull):
            reply = None
        return Outcome(text, reply, time.monotonic(), sent_at)

    tasks = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) * rate_per_s)
        tasks += [asyncio.create_task(one(i)) for i in range(len(tasks), due)]
        await asyncio.sleep(0.01)
    return list(await asyncio.gather(*tasks))


def load_through(
    settings: Settings, tag: str, fault: Callable[[], None], seconds: float, rate_per_s: float
) -> tuple[list[Outcome], float]:
    """`seconds` of load at `rate_per_s`; `fault` runs (in a thread) a quarter of the way
    in. Returns the outcomes and the recovery time from the fault (recovery_time)."""

    async def scenario() -> tuple[list[Outcome], float]:
        async with Client(settings=settings, reply_topic=settings.topics.replies, reply_grace_s=60) as client:
            load = asyncio.create_task(offer_load(client, tag, seconds, rate_per_s))
            await asyncio.sleep(seconds / 4)
            fault_at = time.monotonic()
            await asyncio.to_thread(fault)
            outcomes = await load
            return outcomes, recovery_time(outcomes, fault_at)

    return asyncio.run(scenario())


def lost(outcomes: list[Outcome]) -> int:
    """Requests with no `ok` reply carrying their own text (echo)."""
    return sum(1 for o in outcomes if o.reply is None or not o.reply.ok or o.reply.text != o.text)


def recovery_time(outcomes: list[Outcome], fault_at: float) -> float:
    """Seconds from the fault until every request sent up to a second after it was
    answered: what the fault held up (a dead member's partitions wait for the group
    to notice, a restarted broker for its clients to reconnect)."""
    around = [o.done_at for o in outcomes if o.sent_at <= fault_at + 1.0]
    return round(max(around, default=fault_at) - fault_at, 2)


def fault_summary(
    case: str, outcomes: list[Outcome], recovery_s: float, settings: Settings | None = None, **extra: object
) -> dict[str, Any]:
    """Prints the case's one-line JSON summary (`FAULT {...}`, gathered by `make
    test-faults`) and returns it. With `settings`, also counts the requests whose reply
    is on the reply topic more than once (copies the client dropped)."""
    import json

    answered = [o.reply.request_id for o in outcomes if o.reply is not None]
    figures: dict[str, Any] = {
        "case": case,
        "sent": len(outcomes),
        "answered_ok": sum(1 for o in outcomes if o.reply is not None and o.reply.ok),
        "lost": lost(outcomes),
        "duplicates_to_caller": len(answered) - len(set(answered)),
        "recovery_s": recovery_s,
        "max_latency_s": round(max((o.done_at - o.sent_at for o in outcomes if o.sent_at), default=0.0), 2),
        **extra,
    }
    if settings is not None:
        figures["repeated_on_reply_topic"] = repeated_replies(settings, set(answered))
    print("FAULT " + json.dumps(figures), flush=True)
    return figures


def repeated_replies(settings: Settings, request_ids: set[str], timeout_s: float = 30) -> int:
    """Of `request_ids`, how many have more than one reply on the reply topic."""
    from collections import Counter

    reader = TopicReader(settings, settings.topics.replies)
    try:

        def counts() -> Counter[str]:
            return Counter(k for m in reader.poll() if (k := (m.key() or b"").decode()) in request_ids)

        wait_for(lambda: set(counts()) >= request_ids, timeout_s, "every reply on the reply topic")
        return sum(1 for n in counts().values() if n > 1)
    finally:
        reader.close()


class GatewayProcess:
    """`python -m gateway` on a free loopback port for `settings`, with one API key for `tenant`."""

    def __init__(self, settings: Settings, tenant: str = "acme") -> None:
        self.key = new_key()
        self.tenant = tenant
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        folder = LOG_DIR / f"gateway-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True, exist_ok=True)
        keys = folder / "keys.yaml"
        keys.write_text(f"{digest(self.key)}: {tenant}\n")
        env = {**os.environ, **settings_env(settings)}
        cmd = [sys.executable, "-m", "gateway", "--port", str(self.port), "--api-keys", str(keys)]
        self.proc: subprocess.Popen[bytes] = spawn(cmd, folder / "gateway.log", env)
        wait_listening(self.proc, self.port, "the gateway", folder / "gateway.log", 30)

    def stop(self) -> None:
        stop_pid(self.proc.pid)
