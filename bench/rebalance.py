"""`tidegate bench rebalance`: what a worker joining or leaving costs the callers, per
consumer group protocol (classic eager rebalances, or KIP-848's incremental ones).

For each protocol a fresh stack on Apache Kafka (echo model, one worker) takes a
steady open-loop load; a second worker joins a third of the way in and leaves
(SIGTERM) at two thirds. Reported per event: the longest gap between two replies
in the 5 s after it, and the p99 latency of the requests sent in that time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile
from streams.client import Client
from streams.config import Settings
from tidegate import devstack
from tidegate.processes import stop_pid

RATE_PER_S = 100.0
DURATION_S = 30.0
WINDOW_S = 5.0


async def _load(settings: Settings, events: dict[str, float], extra: Any) -> list[tuple[float, float]]:
    """(sent, answered) per request; `extra` joins and leaves on schedule."""
    results: list[tuple[float, float]] = []
    async with Client(settings=settings) as client:

        async def one(i: int) -> None:
            sent = time.monotonic()
            reply = await client.generate(
                [{"role": "user", "content": f"r{i}"}], f"s{i % 64}", max_new_tokens=4, deadline_s=60
            )
            if reply.ok:
                results.append((sent, time.monotonic()))

        started = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        schedule = [(DURATION_S / 3, "join"), (2 * DURATION_S / 3, "leave")]
        while time.monotonic() - started < DURATION_S:
            if schedule and time.monotonic() - started >= schedule[0][0]:
                _, event = schedule.pop(0)
                events[event] = time.monotonic()
                asyncio.get_running_loop().run_in_executor(None, extra, event)
            due = int((time.monotonic() - started) * RATE_PER_S)
            tasks += [asyncio.create_task(one(i)) for i in range(len(tasks), due)]
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
    return results


def _window(results: list[tuple[float, float]], at: float) -> dict[str, float]:
    done = sorted(a for _, a in results if at <= a <= at + WINDOW_S)
    gaps = [b - a for a, b in itertools.pairwise(done)]
    latencies = [a - s for s, a in results if at <= s <= at + WINDOW_S]
    return {
        "max_reply_gap_ms": round(max(gaps, default=0.0) * 1000, 1),
        "p99_latency_ms": round(percentile(latencies, 99) * 1000, 1),
        "p50_latency_ms": round(percentile(latencies, 50) * 1000, 1),
    }


def measure(protocol: str) -> dict[str, Any]:
    log_dir = Path(".tidegate/bench-logs") / f"rebalance-{protocol}"
    env = {
        "TIDEGATE_WORKER_GROUP_PROTOCOL": protocol,
        "TIDEGATE_WORKERS_CAP_MESSAGES": "100000",
        "TIDEGATE_PROCESSORS_CAP_MESSAGES": "100000",
    }
    print(f"== rebalance, {protocol} protocol: starting a fresh stack on Apache Kafka")
    stack = devstack.up(model="echo", log_dir=log_dir, extra_env=env, broker="kafka")
    joined: list[int] = []
    try:
        stage_env = {**stack.env(), "TIDEGATE_MODEL": "echo", **env}

        def extra(event: str) -> None:
            if event == "join":
                proc = devstack.start_stage("inference", stage_env, log_dir, name="inference-extra")
                joined.append(proc.pid)
            elif joined:
                stop_pid(joined.pop())

        settings = Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, broker="kafka")
        events: dict[str, float] = {}
        results = asyncio.run(_load(settings, events, extra))
    finally:
        for pid in joined:
            stop_pid(pid)
        stack.stop()
    steady = [a - s for s, a in results if s < events["join"]]
    summary = {
        "requests": len(results),
        "steady_p50_latency_ms": round(percentile(steady, 50) * 1000, 1),
        "steady_p99_latency_ms": round(percentile(steady, 99) * 1000, 1),
        "join": _window(results, events["join"]),
        "leave": _window(results, events["leave"]),
    }
    join, leave = summary["join"], summary["leave"]
    print(
        f"{protocol:8s} steady p99 {summary['steady_p99_latency_ms']} ms; join: gap {join['max_reply_gap_ms']} ms,"
        f" p99 {join['p99_latency_ms']} ms; leave: gap {leave['max_reply_gap_ms']} ms, p99 {leave['p99_latency_ms']} ms"
    )
    return summary


def run(protocols: list[str]) -> dict[str, Any]:
    return {
        "benchmark": "rebalance",
        "rate_per_s": RATE_PER_S,
        "protocols": {p: measure(p) for p in protocols},
    }
