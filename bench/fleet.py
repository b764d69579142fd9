"""`tidegate bench fleet`: a fleet behind one queue (issue 26, item 7), on Apache Kafka.

The pools run simulated accelerators (`sim:STEP_MS`: a batch waits STEP_MS per decode
step, whatever its rows), so their speeds are set by STEP_MS and max_batch, not by the
machine's cores. Three cases, each on a fresh dev stack started with a fleet file
written to its log dir (.tidegate/bench-logs/fleet-CASE/fleet.yaml):

1. overflow: model `large` in pool `primary`, with `small` (pool `fallback`) as its
   default fallback. Each pool's capacity is measured alone first (a closed loop
   pinned to its model: `fallbacks=[the model itself]` leaves no fallback), then 3x
   the primary's capacity is offered for `large`, open loop, for OFFER_S: goodput (ok
   replies within the deadline per second, over the steady part of the run) against
   the two capacities' sum, the share the fallback served (`fallback_from` set), and
   the requests lost. The open loop does not retry a QueueFull (`wait=False`): each
   request stands for a caller of its own, and a refusal before sending is the
   backpressure the fleet owes a caller once both pools are full; retried, the same
   callers would only add refusals (the pools are saturated either way) and take the
   CPU the stack shares with the load generator on this machine.
2. kill: the primary pool's worker is started by the bench (its pool has 0 replicas
   in the file: the supervisor would restart a killed worker within a second, and no
   circuit would open), serves a steady open loop, and is SIGKILLed: the time until
   its published circuit opens, the fallback's goodput meanwhile, the requests queued
   in the primary (they wait for it: design point 4), the time from its return until
   the circuit closes again, and the requests lost.
3. routing: one model in two pools at speeds 1:4 (sim:10 and sim:40, same max_batch),
   offered ROUTING_LOAD of their combined ceiling, open loop, once with ROUTING=pressure
   and once with ROUTING=round_robin (each on a fresh stack): goodput and p99 side by
   side, and the share the slow pool served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bench.fleet_summary import (
    LOST,
    REJECTED,
    Outcome,
    circuit_changes,
    first_seen,
    fleet_text,
    format_kill,
    format_overflow,
    format_routing,
    kill_summary,
    nominal_rps,
    overflow_summary,
    routing_summary,
    slope_rate,
)
from bench.overload import RecordingBoard, _as_control_plane
from streams.client import Client
from streams.config import Settings
from streams.exceptions import QueueFull, ReplyTimeout, SendTimeout
from streams.lifecycle import READY_MARKER
from streams.pressure_feed import PressureListener
from tidegate import devstack
from tidegate.processes import wait_until
from tidegate.supervisor import Plan, pool_role

T = TypeVar("T")
LOG_ROOT = Path(".tidegate/bench-logs")
NEW_TOKENS = 16
PROMPT = "What colour is the sky at noon?"
DEADLINE_S = 10.0
REPLY_GRACE_S = 30.0  # past the deadline a reply is still awaited: later is `lost`
PACING_TICK_S = 0.01  # the open loop sends what is due every tick (bench/overload.py)
ENV = {
    "TIDEGATE_BATCHING": "static",
    "TIDEGATE_RESPONSE_CACHE_TTL_S": "0",
    # rows are what a simulated step is charged by, not tokens (bench/scale.py)
    "TIDEGATE_BATCH_TOKENS": "1000000",
    "TIDEGATE_MAX_BATCH": "8",
}

# 1. overflow: two pools of 25 replies/s each (sim:20, batches of 8, 16 steps)
OVERFLOW_STEP_MS, OVERFLOW_BATCH = 20, 8
CAPACITY_CONCURRENCY = 48  # six batches of the pool's: never idle, under its cap
CAPACITY_WARMUP_S, CAPACITY_S = 4.0, 14.0
FACTOR = 3.0
OFFER_S, SETTLE_S = 30.0, 5.0  # the queues are full within ~2 s at 3x; goodput after SETTLE_S

# 2. kill: the same two pools; the load is 60% of the primary's ceiling
KILL_LOAD = 0.6
KILL_DEADLINE_S = 60.0  # the primary's queue waits out the outage, its requests answered ok
BEFORE_KILL_S = 8.0
OPEN_WAIT_S = 45.0  # the session timeout (6 s), the group read empty for 2 s, a sample
HELD_OPEN_S = 12.0  # past the first cool-down (CIRCUIT_OPEN_S, 10 s): the pool is still away
CLOSE_WAIT_S = 60.0
AFTER_CLOSE_S = 5.0
KILL_MAX_S = 300.0  # the load's bound, past every wait above
PRIMARY_STAGE = "workers.primary"  # its key on the pressure topic

# 3. routing: 1:4
FAST_STEP_MS, SLOW_STEP_MS, ROUTING_BATCH = 10, 40, 8
ROUTING_LOAD = 0.75
ROUTING_WARMUP_S, ROUTING_S = 8.0, 25.0


def overflow_fleet(replicas: int = 1) -> str:
    """`large` in `primary`, `small` (its default fallback) in `fallback`;
    `replicas`: the primary's workers the stack starts (the kill case starts its own)."""
    engine = f"sim:{OVERFLOW_STEP_MS}"
    return fleet_text(
        {"large": {"token_budget": 1024, "fallbacks": ["small"]}, "small": {"token_budget": 512}},
        {
            "primary": {"engine": engine, "models": ["large"], "max_batch": OVERFLOW_BATCH, "replicas": replicas},
            "fallback": {"engine": engine, "models": ["small"], "max_batch": OVERFLOW_BATCH},
        },
    )


def routing_fleet() -> str:
    """One model in two pools at speeds 1:4, equal weights: the router learns the
    speeds from the pools' drain rates, as it must in production."""
    return fleet_text(
        {"chat": {"token_budget": 1024}},
        {
            "fast": {"engine": f"sim:{FAST_STEP_MS}", "models": ["chat"], "max_batch": ROUTING_BATCH},
            "slow": {"engine": f"sim:{SLOW_STEP_MS}", "models": ["chat"], "max_batch": ROUTING_BATCH},
        },
    )


# -- load ---------------------------------------------------------------------


async def _one(
    client: Client,
    session: str,
    outcomes: list[Outcome],
    model: str,
    fallbacks: Sequence[str],
    deadline_s: float,
    wait: bool = False,
) -> None:
    started = time.monotonic()
    try:
        reply = await client.generate(
            [{"role": "user", "content": PROMPT}],
            session,
            model=model,
            fallbacks=list(fallbacks),
            max_new_tokens=NEW_TOKENS,
            deadline_s=deadline_s,
            wait=wait,
        )
    except QueueFull:
        outcomes.append(Outcome(started, time.monotonic(), REJECTED))
    except SendTimeout:  # the broker never acknowledged it: not accepted, so not lost
        outcomes.append(Outcome(started, time.monotonic(), "unsent"))
    except ReplyTimeout:
        outcomes.append(Outcome(started, time.monotonic(), LOST))
    else:
        outcomes.append(
            Outcome(
                started,
                time.monotonic(),
                reply.status,
                reply.model,
                reply.fallback_from,
                reply.fallback_reason,
                reply.timings.inference_ms,
            )
        )


async def _closed_loop(client: Client, prefix: str, model: str, seconds: float) -> float:
    """CAPACITY_CONCURRENCY requests for `model` always in flight for `seconds`, pinned
    to it (`fallbacks=[model]`: repeats are left out of its candidates); the ok
    replies/s after CAPACITY_WARMUP_S."""
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + seconds

    async def lane(k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            await _one(client, f"{prefix}-{i}", outcomes, model, [model], DEADLINE_S, wait=True)
            i += CAPACITY_CONCURRENCY

    started = time.monotonic()
    await asyncio.gather(*(lane(k) for k in range(CAPACITY_CONCURRENCY)))
    ok = [o.done_at for o in outcomes if o.status == "ok"]
    return slope_rate(ok, started + CAPACITY_WARMUP_S, stop_at)


async def _open_loop(
    client: Client,
    prefix: str,
    rate: float,
    max_s: float,
    outcomes: list[Outcome],
    model: str,
    deadline_s: float = DEADLINE_S,
    stop: threading.Event | None = None,
) -> tuple[float, int]:
    """`rate` requests/s for `model` (its default fallbacks) until `max_s` passed or
    `stop` is set, then every reply awaited; (when it started, requests sent)."""
    tasks: list[asyncio.Task[None]] = []
    n = int(rate * max_s)
    t0 = time.monotonic()
    while len(tasks) < n and not (stop is not None and stop.is_set()):
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        tasks.extend(
            asyncio.create_task(_one(client, f"{prefix}-{i}", outcomes, model, (), deadline_s))
            for i in range(len(tasks), due)
        )
        await asyncio.sleep(PACING_TICK_S)
    await asyncio.gather(*tasks)
    return t0, len(tasks)


def _client(settings: Settings) -> Client:
    return Client(settings=settings, reply_grace_s=REPLY_GRACE_S)


# -- stacks -------------------------------------------------------------------


def _on_fresh_stack(name: str, fleet: str, job: Callable[[devstack.DevStack, Settings], T], **env: str) -> T:
    """Runs `job` on a fresh stack with `fleet` as its fleet file (written to the
    case's log dir) and `env` on top of ENV; the stack is stopped after."""
    log_dir = LOG_ROOT / f"fleet-{name}"
    log_dir.mkdir(parents=True, exist_ok=True)
    fleet_path = log_dir / "fleet.yaml"
    fleet_path.write_text(fleet)
    print(f"== fleet / {name}: a fresh stack on Apache Kafka, fleet file {fleet_path}")
    model = f"sim:{OVERFLOW_STEP_MS}"  # MODEL: only the processors' token counter reads it; pools name engines
    stack = devstack.up(model=model, log_dir=log_dir, extra_env={**ENV, **env}, broker="kafka", fleet_file=fleet_path)
    try:
        return job(stack, Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, broker="kafka"))
    finally:
        stack.stop()


def _start_worker(stack: devstack.DevStack, pool: str, name: str) -> subprocess.Popen[bytes]:
    """A worker of `pool`, started as the supervisor starts one (its plan's env, the
    pool's role and metrics port), at the workers' priority: from the main thread,
    which the load generator's lower priority was not given to."""
    plan = Plan.load(Path(stack.log_dir) / "supervisor-plan.json")
    stage = plan.stage(pool_role(pool), name)
    env = {**plan.env, **stage.env, "TIDEGATE_METRICS_PORT": str(stage.metrics_port)}
    proc = devstack.start_stage(stage.module, env, Path(stack.log_dir), stage.nice, stage.name)
    stack.pids[stage.role] = proc.pid  # stack.stop() stops it with the rest
    return proc


def _wait_ready(stack: devstack.DevStack, proc: subprocess.Popen[bytes], name: str) -> float:
    devstack.wait_for_ready(Path(stack.log_dir) / f"{name}.log", READY_MARKER, proc, 120)
    return time.monotonic()


def _reniced(nice: int, load: Callable[[], T]) -> T:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    return load()


# -- the cases ----------------------------------------------------------------


def overflow() -> dict[str, Any]:
    def job(stack: devstack.DevStack, settings: Settings) -> dict[str, Any]:
        async def measure() -> dict[str, Any]:
            async with _client(settings) as client:
                capacity = {}
                for pool, model in (("primary", "large"), ("fallback", "small")):
                    capacity[pool] = await _closed_loop(client, f"cap-{pool}", model, CAPACITY_WARMUP_S + CAPACITY_S)
                    print(f"  capacity of {pool} alone: {capacity[pool]:.1f}/s")
                rate = FACTOR * capacity["primary"]
                outcomes: list[Outcome] = []
                t0, sent = await _open_loop(client, "over", rate, OFFER_S, outcomes, "large")
            summary = overflow_summary(outcomes, sent, (t0 + SETTLE_S, t0 + OFFER_S), capacity, DEADLINE_S)
            return {"capacity_rps": {k: round(v, 1) for k, v in capacity.items()}, "offered_rps": round(rate, 1)} | (
                summary
            )

        return _as_control_plane(settings.control_plane_nice, lambda: asyncio.run(measure()))

    result = _described(_on_fresh_stack("overflow", overflow_fleet(), job))
    result["nominal_rps_per_pool"] = round(nominal_rps(OVERFLOW_STEP_MS, OVERFLOW_BATCH, NEW_TOKENS), 1)
    print(format_overflow(result))
    return result


def kill() -> dict[str, Any]:
    rate = KILL_LOAD * nominal_rps(OVERFLOW_STEP_MS, OVERFLOW_BATCH, NEW_TOKENS)

    def job(stack: devstack.DevStack, settings: Settings) -> dict[str, Any]:
        proc = _start_worker(stack, "primary", "inference.primary")
        _wait_ready(stack, proc, "inference.primary")
        board = RecordingBoard(settings.pressure_stale_s, settings.warn_ratio)
        listener = PressureListener(settings, board)
        listener.start()
        outcomes: list[Outcome] = []
        marks: dict[str, float | None] = {"started": None, "killed": None, "returned": None, "ready": None}
        began, stop = threading.Event(), threading.Event()

        async def load() -> int:
            async with _client(settings) as client:
                began.set()  # the client started: the load begins now
                t0, sent = await _open_loop(
                    client, "kill", rate, KILL_MAX_S, outcomes, "large", deadline_s=KILL_DEADLINE_S, stop=stop
                )
                marks["started"] = t0
                return sent

        try:
            with ThreadPoolExecutor(1, thread_name_prefix="tidegate-load") as pool:
                future = pool.submit(_reniced, settings.control_plane_nice, lambda: asyncio.run(load()))
                try:
                    began.wait(60)
                    _outage(stack, proc, board, marks, stop)
                finally:
                    stop.set()
                    sent = future.result()
        finally:
            listener.close()
        summary = kill_summary(outcomes, sent, circuit_changes(board.timeline, PRIMARY_STAGE), marks, "large")
        return {"offered_rps_nominal": round(rate, 1), "deadline_s": KILL_DEADLINE_S} | summary

    result = _described(_on_fresh_stack("kill", overflow_fleet(replicas=0), job))
    print(format_kill(result))
    return result


def _outage(
    stack: devstack.DevStack,
    proc: subprocess.Popen[bytes],
    board: RecordingBoard,
    marks: dict[str, float | None],
    stop: threading.Event,
) -> None:
    """On the main thread while the load runs: the primary's workers SIGKILLed, the
    circuit awaited open and held so past its first cool-down, the workers started
    again, the circuit awaited closed; each wait bounded, one that runs out printed
    (the summary says `never`)."""

    def seen(circuit: str, after: float) -> bool:
        return first_seen(circuit_changes(board.timeline, PRIMARY_STAGE), circuit, after) is not None

    stop.wait(BEFORE_KILL_S)
    for pid in stack.role_pids(pool_role("primary")):
        os.killpg(pid, signal.SIGKILL)
    killed = marks["killed"] = time.monotonic()
    proc.wait(10)
    print(f"  primary's worker SIGKILLed (pid {proc.pid})")
    try:
        wait_until(lambda: seen("open", killed), OPEN_WAIT_S, "the circuit to open", 0.05)
        opened = first_seen(circuit_changes(board.timeline, PRIMARY_STAGE), "open", killed) or killed
        print(f"  circuit open {opened - killed:.1f} s after the kill")
        stop.wait(max(0.0, opened + HELD_OPEN_S - time.monotonic()))
    except devstack.DevStackError as exc:
        print(f"  {exc}: the workers come back anyway")
    proc = _start_worker(stack, "primary", "inference.primary-2")
    returned = marks["returned"] = time.monotonic()
    marks["ready"] = _wait_ready(stack, proc, "inference.primary-2")
    try:
        wait_until(lambda: seen("closed", returned), CLOSE_WAIT_S, "the circuit to close", 0.05)
    except devstack.DevStackError as exc:
        print(f"  {exc}")
    stop.wait(AFTER_CLOSE_S)


def routing() -> dict[str, Any]:
    ceiling = sum(nominal_rps(step, ROUTING_BATCH, NEW_TOKENS) for step in (FAST_STEP_MS, SLOW_STEP_MS))
    rate = ROUTING_LOAD * ceiling
    # a slow pool's batch is 4x a fast one's: a reply's batch time says which served it
    slow_batch_ms = (FAST_STEP_MS * SLOW_STEP_MS) ** 0.5 * NEW_TOKENS

    def job(stack: devstack.DevStack, settings: Settings) -> dict[str, Any]:
        async def offer() -> dict[str, Any]:
            outcomes: list[Outcome] = []
            async with _client(settings) as client:
                t0, sent = await _open_loop(client, "route", rate, ROUTING_WARMUP_S + ROUTING_S, outcomes, "chat")
            window = (t0 + ROUTING_WARMUP_S, t0 + ROUTING_WARMUP_S + ROUTING_S)
            return routing_summary(outcomes, sent, window, DEADLINE_S, slow_batch_ms)

        return _as_control_plane(settings.control_plane_nice, lambda: asyncio.run(offer()))

    runs = {
        mode: _described(_on_fresh_stack(f"routing-{mode}", routing_fleet(), job, TIDEGATE_ROUTING=mode))
        for mode in ("pressure", "round_robin")
    }
    result = {
        "pools": {"fast": f"sim:{FAST_STEP_MS}", "slow": f"sim:{SLOW_STEP_MS}", "max_batch": ROUTING_BATCH},
        "ceiling_rps": round(ceiling, 1),
        "offered_rps": round(rate, 1),
        "runs": runs,
        "pressure_wins_p99": runs["pressure"]["p99_ms"] < runs["round_robin"]["p99_ms"],
    }
    print(format_routing(runs))
    return result


def _described(result: dict[str, Any]) -> dict[str, Any]:
    """The machine's load beside a case's figures: it is shared."""
    return result | {"load_average_after": [round(x, 2) for x in os.getloadavg()]}


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }


CASES: dict[str, Callable[[], dict[str, Any]]] = {"overflow": overflow, "kill": kill, "routing": routing}


def run(cases: Sequence[str] = tuple(CASES)) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {"benchmark": "fleet", "broker": "kafka", "machine": machine(), "cases": {}}
    for name in cases:
        results["cases"][name] = CASES[name]()
    results["wall_s"] = round(time.monotonic() - started, 1)
    return results
