"""`tidegate bench scale`: throughput with 1, 2, 4 and 8 workers on Apache Kafka.

The workers run a simulated accelerator (`sim:STEP_MS`: a batch waits STEP_MS per
decode step, whatever its rows), so the two CPU cores are not what limits them:
the question is whether the pipeline (partitions, group, batching, commits) lets
N workers do N times the work. Each worker count gets a fresh stack; a closed loop
keeps every worker's queue full (CONCURRENCY_PER_WORKER requests in flight per
worker) and ok replies are counted over MEASURE_S after a warm-up. Reported:
requests/s, the ratio to one worker, and the requests lost (none may be).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from streams.client import Client
from streams.config import Settings
from streams.exceptions import ReplyTimeout
from tidegate import devstack

STEP_MS = 50
NEW_TOKENS = 16
CONCURRENCY_PER_WORKER = 48
WARMUP_S = 8.0
MEASURE_S = 20.0
SESSIONS = 512  # keys spread over the contexts topic's partitions
PROMPT = " ".join(f"w{i}" for i in range(40))  # longer than NEW_TOKENS: every row decodes NEW_TOKENS steps


async def _closed_loop(settings: Settings, concurrency: int) -> tuple[float, int, int]:
    """(ok replies/s over MEASURE_S, replies, lost)."""
    done: list[float] = []
    lost = 0
    stop_at = time.monotonic() + WARMUP_S + MEASURE_S
    async with Client(settings=settings, reply_grace_s=30) as client:

        async def loop(lane: int) -> None:
            nonlocal lost
            i = 0
            while time.monotonic() < stop_at:
                i += 1
                try:
                    reply = await client.generate(
                        [{"role": "user", "content": PROMPT}],
                        f"s{(lane * 7919 + i) % SESSIONS}",
                        max_new_tokens=NEW_TOKENS,
                        deadline_s=60,
                    )
                except ReplyTimeout:
                    lost += 1
                    continue
                if reply.ok:
                    done.append(time.monotonic())
                else:
                    lost += 1

        started = time.monotonic()
        await asyncio.gather(*(loop(lane) for lane in range(concurrency)))
    window = [t for t in done if started + WARMUP_S <= t <= started + WARMUP_S + MEASURE_S]
    return len(window) / MEASURE_S, len(done), lost


def measure(workers: int) -> dict[str, Any]:
    log_dir = Path(".tidegate/bench-logs") / f"scale-{workers}"
    env = {
        "TIDEGATE_BATCHING": "static",
        "TIDEGATE_BACKPRESSURE": "false",  # saturation on purpose
        "TIDEGATE_RESPONSE_CACHE_TTL_S": "0",
        "TIDEGATE_MAX_BATCH": "16",
        # rows are what a simulated step is charged by, not tokens: the batch's token
        # budget (sized for the CPU's real model) would cap it at a few rows
        "TIDEGATE_BATCH_TOKENS": "1000000",
    }
    print(f"== scale: {workers} worker(s) on Apache Kafka, model sim:{STEP_MS}")
    stack = devstack.up(
        model=f"sim:{STEP_MS}", log_dir=log_dir, extra_env=env, broker="kafka", workers=workers, processors=2
    )
    try:
        settings = Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, backpressure=False)
        rate, replies, lost = asyncio.run(_closed_loop(settings, CONCURRENCY_PER_WORKER * workers))
    finally:
        stack.stop()
    print(f"{workers} worker(s): {rate:.1f} requests/s ({replies} replies, {lost} lost)")
    return {"workers": workers, "requests_per_s": round(rate, 1), "replies": replies, "lost": lost}


def run(counts: list[int]) -> dict[str, Any]:
    results = [measure(n) for n in counts]
    base = results[0]["requests_per_s"] or 1.0
    for r in results:
        r["x_one_worker"] = round(r["requests_per_s"] / base, 2)
    ideal = 1000 / (STEP_MS * NEW_TOKENS) * 16  # one worker, full batches, no overhead
    return {
        "benchmark": "scale",
        "model": f"sim:{STEP_MS}",
        "ideal_one_worker_rps": round(ideal, 1),
        "runs": results,
    }
