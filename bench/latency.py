"""`tidegate bench latency`: end-to-end latency of single requests, and where it goes.

For each broker and model a fresh dev stack (broker, Redis, monitor, processor,
worker) is started; requests are sent one at a time (no queueing), after a few
warm-up requests. `caller` is what the caller sees: from `generate` called to the
reply in hand; `reply_total` is the reply's own total (created -> reply produced).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile
from streams.client import Client
from streams.config import Settings
from streams.outgoing import TIMING_FIELDS
from tidegate import devstack

WARMUP = 3
MAX_NEW_TOKENS = 16
TIME_LIMIT_S = 300.0


async def _measure(settings: Settings, requests: int) -> list[dict[str, Any]]:
    replies = []
    async with Client(settings=settings) as client:
        for i in range(WARMUP):
            await client.generate([{"role": "user", "content": f"warm up {i}"}], f"warm-{i}", max_new_tokens=4)
        stop_at = time.monotonic() + TIME_LIMIT_S
        for i in range(requests):
            if time.monotonic() > stop_at:
                break
            called = time.perf_counter()
            reply = await client.generate(
                [{"role": "user", "content": f"Question {i}: name a colour of the sky."}],
                f"bench-{i}",
                max_new_tokens=MAX_NEW_TOKENS,
            )
            caller_ms = (time.perf_counter() - called) * 1000
            if not reply.ok:
                raise RuntimeError(f"benchmark request failed: {reply.status} {reply.error}")
            replies.append({**reply.to_record(), "caller_ms": caller_ms})
    return replies


def summarize(replies: list[dict[str, Any]]) -> dict[str, Any]:
    totals = [r["timings"]["total_ms"] for r in replies]
    callers = [r["caller_ms"] for r in replies]
    mean_total = sum(totals) / len(totals)
    stages = [f for f in TIMING_FIELDS if f != "total_ms"]
    means = {f: sum(r["timings"][f] for r in replies) / len(replies) for f in stages}
    accounted = sum(means.values())
    return {
        "requests": len(replies),
        "caller_p50_ms": round(percentile(callers, 50), 1),
        "caller_p99_ms": round(percentile(callers, 99), 1),
        "reply_total_p50_ms": percentile(totals, 50),
        "reply_total_p99_ms": percentile(totals, 99),
        "mean_ms": round(mean_total, 1),
        "mean_stage_ms": {k: round(v, 1) for k, v in means.items()},
        # the rest: Kafka hops to the processor's and back from the worker, client overheads
        "stage_share": {
            **{k: round(v / mean_total, 3) for k, v in means.items()},
            "transport_other": round(max(0.0, mean_total - accounted) / mean_total, 3),
        },
        "mean_tokens_out": round(sum(r["tokens_out"] for r in replies) / len(replies), 1),
    }


def run(models: list[str], requests: int, brokers: list[devstack.Broker]) -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "latency", "max_new_tokens": MAX_NEW_TOKENS, "brokers": {}}
    for broker in brokers:
        results["brokers"][broker] = {}
        for model in models:
            print(f"== {broker} / {model}: starting a fresh dev stack")
            stack = devstack.up(model=model, log_dir=Path(".tidegate/bench-logs") / f"{broker}-{model}", broker=broker)
            try:
                settings = Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, broker=broker)
                summary = summarize(asyncio.run(_measure(settings, requests)))
            finally:
                stack.stop()
            results["brokers"][broker][model] = summary
            shares = ", ".join(f"{k} {v:.0%}" for k, v in summary["stage_share"].items())
            print(
                f"{broker:6s} {model:8s} n={summary['requests']} caller p50 {summary['caller_p50_ms']:.1f} ms"
                f"  p99 {summary['caller_p99_ms']:.1f} ms  ({shares})"
            )
    return results
