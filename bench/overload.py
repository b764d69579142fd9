"""`tidegate bench overload`: 3x capacity for a minute, with and without backpressure.

1. capacity: a fresh stack, backpressure off, kept saturated by a closed loop of
   concurrent requests; capacity = ok replies per second after a warm-up, over as
   long as the offered load will last (`duration_s`).
2. two runs on fresh stacks, same open-loop offered load (factor x capacity for
   `duration_s`, what is due sent every PACING_TICK_S): once with backpressure, once
   without. Each stack first gets the same warm-up as a capacity run (the closed loop for
   CAPACITY_WARMUP_S, every reply awaited), so that a cold start (faust's first
   fetch, first model calls) is left out of goodput as it is out of capacity. Capacity
   is measured again between them, and goodput is set against the mean of the two
   measurements around the backpressure run: on a shared 2-core machine speed
   drifts by 10-15% over minutes, and one measurement before would bias it.
Per run: goodput (ok replies within their deadline per second of offered load),
accepted p50/p99 and their bound (the median cap's drain time plus two batch
times), QueueFull count and client-side p99, max lag against the cap
(from the published PressureStates), and lost requests (sent, never answered,
never rejected). A PNG shows lag, cap and latency over time for both runs.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import percentile
from streams.client import Client
from streams.config import Settings
from streams.exceptions import QueueFull, ReplyTimeout, SendTimeout
from streams.lag import PROCESSORS, WORKERS
from streams.pressure import PressureBoard
from streams.pressure_feed import PressureListener
from tidegate import devstack

MAX_NEW_TOKENS = 16
DEADLINE_S = 10.0
CAPACITY_CONCURRENCY = 256  # about 4 s of backlog for the tiny model: never idle
# replies that come after the deadline still count as answered (late), not lost
REPLY_GRACE_S = 60.0
CAPACITY_WARMUP_S = 5.0
WARMUP_FIRST_ID = 10_000_000  # warm-up sessions apart from the measured ones
# the open loop sends what is due every tick, not one wake-up per request: at 600
# requests/s a sleep per request cost the load generator 181 us of CPU each against
# 14 us for the request itself (a refused one), on the cores the stack shares
PACING_TICK_S = 0.01
STAGES = ("queued_ms", "context_ms", "batch_wait_ms", "inference_ms")


class RecordingBoard(PressureBoard):
    """A PressureBoard that also keeps every state it is given, for the timeline."""

    def __init__(self, stale_s: float, warn_ratio: float) -> None:
        super().__init__(stale_s, warn_ratio)
        self.timeline: list[dict[str, Any]] = []

    def publish(self, state: dict[str, Any]) -> None:
        self.timeline.append({**state, "seen_at": time.monotonic()})
        super().publish(state)


@dataclass(slots=True)
class Outcome:
    sent_at: float  # monotonic
    done_at: float
    status: str  # a reply status, "rejected:STAGE" (QueueFull) or "lost"
    latency_ms: float
    total_ms: int = 0  # the reply's own end-to-end time
    timings: dict[str, int] | None = None  # the reply's per-stage timings


def _request(i: int) -> list[dict[str, str]]:
    """A single question in a session of its own: every request costs the same, so
    capacity does not drift as conversations grow (that is the compression bench's
    subject, not this one's)."""
    return [{"role": "user", "content": f"Question {i}: what colour is the sky at noon?"}]


async def _one(client: Client, i: int, outcomes: list[Outcome], wait: bool = False) -> None:
    started = time.monotonic()
    try:
        reply = await client.generate(
            _request(i), f"load-{i}", max_new_tokens=MAX_NEW_TOKENS, deadline_s=DEADLINE_S, wait=wait
        )
        status, total, timings = reply.status, reply.timings.total_ms, reply.to_record()["timings"]
    except QueueFull as exc:
        status, total, timings = f"rejected:{exc.stage}", 0, None
    except SendTimeout:  # the broker never acknowledged it: not accepted, so not lost
        status, total, timings = "unsent", 0, None
    except ReplyTimeout:
        status, total, timings = "lost", 0, None
    done = time.monotonic()
    outcomes.append(Outcome(started, done, status, (done - started) * 1000, total, timings))


async def _closed_loop(client: Client, seconds: float, outcomes: list[Outcome], first: int = 0) -> float:
    """CAPACITY_CONCURRENCY requests always in flight for `seconds`, then every reply
    awaited; returns when it started. With backpressure on, a refused request waits
    (`wait=True`) instead of spinning."""
    stop_at = time.monotonic() + seconds

    async def loop(worker: int) -> None:
        i = first + worker
        while time.monotonic() < stop_at:
            await _one(client, i, outcomes, wait=client.settings.backpressure)
            i += CAPACITY_CONCURRENCY

    started = time.monotonic()
    await asyncio.gather(*(loop(w) for w in range(CAPACITY_CONCURRENCY)))
    return started


async def _capacity(settings: Settings, measure_s: float) -> float:
    """ok replies/s with CAPACITY_CONCURRENCY requests always in flight, over `measure_s`
    after the warm-up: as long as the offered load lasts, since Tansu's
    cost per fetch grows with the record batches it holds (docs/design.md), and a short
    window on a fresh broker overstates what the stack keeps up for a minute."""
    outcomes: list[Outcome] = []
    async with Client(settings=settings, reply_grace_s=REPLY_GRACE_S) as client:
        started = await _closed_loop(client, CAPACITY_WARMUP_S + measure_s, outcomes)
    stop_at = started + CAPACITY_WARMUP_S + measure_s
    window_start = started + CAPACITY_WARMUP_S
    done = [o for o in outcomes if o.status == "ok" and window_start <= o.done_at <= stop_at]
    return len(done) / measure_s


async def _offer(settings: Settings, rate: float, duration_s: float) -> dict[str, Any]:
    outcomes: list[Outcome] = []
    board = RecordingBoard(settings.pressure_stale_s, settings.warn_ratio)
    recorder = PressureListener(settings, board)
    recorder.start()
    try:
        async with Client(settings=settings, reply_grace_s=REPLY_GRACE_S) as client:
            warmup_started = await _closed_loop(client, CAPACITY_WARMUP_S, [], first=WARMUP_FIRST_ID)
            print(f"  warm-up: {time.monotonic() - warmup_started:.1f} s")
            tasks: list[asyncio.Task[None]] = []
            n = int(rate * duration_s)
            t0 = time.monotonic()
            while len(tasks) < n:
                due = min(n, int((time.monotonic() - t0) * rate) + 1)
                tasks.extend(asyncio.create_task(_one(client, i, outcomes)) for i in range(len(tasks), due))
                await asyncio.sleep(PACING_TICK_S)
            offered_s = time.monotonic() - t0
            await asyncio.gather(*tasks)
    finally:
        recorder.close()
    return _summarize(outcomes, board.timeline, t0, n, offered_s)


def _summarize(
    outcomes: list[Outcome], timeline: list[dict[str, Any]], t0: float, sent: int, offered_s: float
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == "ok"]
    good = [o for o in ok if o.latency_ms <= DEADLINE_S * 1000]
    rejected = [o for o in outcomes if o.status.startswith("rejected")]
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    workers = [s for s in timeline if s["stage"] == WORKERS and s["seen_at"] >= t0]
    peak = max(workers, key=lambda s: s["lag"] / max(1, s["cap"]), default=None)
    steady_caps = [s["cap"] for s in workers]
    drain_rates = [s["drain_rate"] for s in workers if s["drain_rate"] > 0]
    median_cap = sorted(steady_caps)[len(steady_caps) // 2] if steady_caps else 0
    median_rate = sorted(drain_rates)[len(drain_rates) // 2] if drain_rates else 0.0
    batch_ms = percentile([o.timings["inference_ms"] for o in ok if o.timings], 50)
    return {
        "sent": sent,
        "offered_rate": round(sent / offered_s, 1),
        "statuses": statuses,
        "goodput": round(len(good) / offered_s, 1),
        "accepted_p50_ms": round(percentile([o.latency_ms for o in ok], 50), 1),
        "accepted_p99_ms": round(percentile([o.latency_ms for o in ok], 99), 1),
        # the target: the cap's drain time plus two batch times
        "accepted_p99_bound_ms": round(median_cap / median_rate * 1000 + 2 * batch_ms, 1) if median_rate else 0.0,
        "accepted_stage_p50_ms": {k: percentile([o.timings[k] for o in ok if o.timings], 50) for k in STAGES},
        "accepted_stage_p99_ms": {k: percentile([o.timings[k] for o in ok if o.timings], 99) for k in STAGES},
        "queue_full_raised": len(rejected),
        "queue_full_p99_ms": round(percentile([o.latency_ms for o in rejected], 99), 3),
        "max_lag": peak["lag"] if peak else 0,
        "cap_at_max_lag": peak["cap"] if peak else 0,
        "max_lag_over_cap": round(peak["lag"] / max(1, peak["cap"]), 3) if peak else 0.0,
        "median_cap": median_cap,
        "median_drain_rate": round(median_rate, 1),
        "lost": statuses.get("lost", 0) + (sent - len(outcomes)),
        "timeline": {
            "lag": [(round(s["seen_at"] - t0, 3), s["lag"], s["cap"]) for s in workers],
            "processors_lag": [
                (round(s["seen_at"] - t0, 3), s["lag"], s["cap"])
                for s in timeline
                if s["stage"] == PROCESSORS and s["seen_at"] >= t0
            ],
            "latency": [(round(o.done_at - t0, 3), round(o.latency_ms, 1)) for o in ok],
        },
    }


def _stack(broker: devstack.Broker, model: str, name: str, backpressure: bool, torch_threads: int) -> devstack.DevStack:
    env = {"TIDEGATE_BACKPRESSURE": str(backpressure).lower(), "TIDEGATE_TORCH_THREADS": str(torch_threads)}
    log_dir = Path(".tidegate/bench-logs") / f"overload-{broker}-{name}"
    return devstack.up(model=model, log_dir=log_dir, extra_env=env, broker=broker)


def _run_on_fresh_stack(
    broker: devstack.Broker, model: str, name: str, backpressure: bool, torch_threads: int, job: Any
) -> Any:
    print(f"== {broker} / {name}: starting a fresh stack (model {model}, backpressure {backpressure})")
    stack = _stack(broker, model, name, backpressure, torch_threads)
    try:
        settings = Settings(
            bootstrap=stack.bootstrap, redis_url=stack.redis_url, backpressure=backpressure, broker=broker
        )
        return _as_control_plane(settings.control_plane_nice, lambda: asyncio.run(job(settings)))
    finally:
        stack.stop()


def _as_control_plane(nice: int, load: Callable[[], Any]) -> Any:
    """Runs `load` in a thread `nice` levels down, like the stack's control plane
    (devstack.up), and returns its result (or raises its error).

    The load generator stands in for services on other machines; on this one it runs
    below the worker, which stands in for the accelerator, like the broker and the
    processors. Under 3x overload it does three times the work of a capacity run
    (every refusal is an attempt), and at the worker's priority that work came out of
    the worker's core in the overload runs only. Linux sets a nice level per thread;
    the client's threads, started from this one, inherit it.
    """

    def reniced() -> Any:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        return load()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidegate-load") as pool:
        return pool.submit(reniced).result()


def run(
    model: str,
    factor: float,
    duration_s: float,
    torch_threads: int,
    plot_path: str | None,
    brokers: list[devstack.Broker],
) -> dict[str, Any]:
    """The overload runs on each broker in turn; a plot per broker (`-BROKER` before
    the plot's suffix when there are several)."""
    results: dict[str, Any] = {"benchmark": "overload", "brokers": {}}
    for broker in brokers:
        path = plot_path
        if plot_path and len(brokers) > 1:
            stem = Path(plot_path)
            path = str(stem.with_name(f"{stem.stem}-{broker}{stem.suffix}"))
        results["brokers"][broker] = _run_on(broker, model, factor, duration_s, torch_threads, path)
    return results


def _run_on(
    broker: devstack.Broker, model: str, factor: float, duration_s: float, torch_threads: int, plot_path: str | None
) -> dict[str, Any]:
    def measure_capacity(settings: Settings) -> Any:
        return _capacity(settings, duration_s)

    before = _run_on_fresh_stack(broker, model, "capacity", False, torch_threads, measure_capacity)
    print(f"capacity: {before:.1f} requests/s at saturation")
    rate = factor * before
    results: dict[str, Any] = {
        "broker": broker,
        "model": model,
        "max_new_tokens": MAX_NEW_TOKENS,
        "deadline_s": DEADLINE_S,
        "duration_s": duration_s,
        "capacity_before_rps": round(before, 1),
        "offered_rps": round(rate, 1),
        "runs": {},
    }
    for name, backpressure in (("with_backpressure", True), ("without_backpressure", False)):
        summary = _run_on_fresh_stack(
            broker, model, name, backpressure, torch_threads, lambda s: _offer(s, rate, duration_s)
        )
        if backpressure:
            after = _run_on_fresh_stack(broker, model, "capacity-again", False, torch_threads, measure_capacity)
            capacity = (before + after) / 2
            print(f"capacity again: {after:.1f} requests/s; mean of the two {capacity:.1f}")
            results["capacity_after_rps"] = round(after, 1)
            results["capacity_rps"] = round(capacity, 1)
        summary["goodput_over_capacity"] = round(summary["goodput"] / capacity, 3) if capacity else 0.0
        results["runs"][name] = summary
        print(_format(name, summary))
    if plot_path:
        from bench.overload_plot import plot

        plot(results, plot_path)
        print(f"plot written to {plot_path}")
    return results


def _format(name: str, s: dict[str, Any]) -> str:
    return (
        f"{name}: sent {s['sent']} at {s['offered_rate']}/s; statuses {s['statuses']}\n"
        f"  goodput {s['goodput']}/s ({s['goodput_over_capacity']:.0%} of capacity); "
        f"accepted p50 {s['accepted_p50_ms']:.0f} ms, p99 {s['accepted_p99_ms']:.0f} ms "
        f"(bound {s['accepted_p99_bound_ms']:.0f} ms)\n"
        f"  QueueFull {s['queue_full_raised']} (p99 {s['queue_full_p99_ms']:.2f} ms); "
        f"max lag {s['max_lag']} vs cap {s['cap_at_max_lag']} ({s['max_lag_over_cap']:.2f}x); lost {s['lost']}"
    )
