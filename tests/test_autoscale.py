"""The autoscaler on a dev stack with a simulated accelerator: a load step from one
worker's capacity to three times it makes the workers' group grow and its lag in
seconds fall back under the target with nothing lost; when the load stops, it
shrinks again. The load ignores the pressure signal (no client-side refusals), so
its demand shows in the arrival rate; the processors answer `queue_full` past the cap."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from streams import Client, Settings
from streams.pressure_feed import PressureListener
from tests.helpers import offer_load, wait_for
from tests.test_cli import run

pytestmark = pytest.mark.serial  # a load step sized to one worker's measured rate

# sim:80, batches of 16 short prompts (a conversation per request, so no history
# grows and the batch token budget never binds), 8 new tokens each: 16 / 0.64 s
ONE_WORKER_RPS = 25.0
TARGET_S = 4.0  # WORKERS_CAP_SECONDS, the autoscaler's target
STEP_S = 60.0
SETTLED_S = 15.0  # the step's last seconds, by which the grown group must keep up


def workers(state_file: Path) -> int:
    found = json.loads(state_file.read_text())["pids"]["worker"]
    return len(found) if isinstance(found, list) else 1


@pytest.mark.timeout(360)
def test_a_load_step_grows_the_workers_and_they_shrink_after(tmp_path: Path) -> None:
    up = run(
        [
            "dev",
            "up",
            "--model",
            "sim:80",
            "--autoscale",
            "--max-workers",
            "4",
            "--out-cooldown",
            "6",
            "--in-cooldown",
            "8",
        ],
        tmp_path,
    )
    state_file = tmp_path / ".tidegate" / "dev.json"
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads(state_file.read_text())
        settings = Settings(bootstrap=state["bootstrap"], redis_url=state["redis_url"], backpressure=False)
        peak, lag_seconds = 1, []

        async def step() -> list:
            nonlocal peak
            async with Client(settings=settings, reply_grace_s=60) as client:
                await offer_load(client, "base", 5.0, ONE_WORKER_RPS, sessions=0)
                load = asyncio.create_task(offer_load(client, "step", STEP_S, 3 * ONE_WORKER_RPS, sessions=0))
                started = time.monotonic()
                watch = PressureListener(settings)
                await asyncio.to_thread(watch.start)
                try:
                    while not load.done():
                        peak = max(peak, workers(state_file))
                        pressure = watch.board.state("workers") or {}
                        lag_seconds.append((time.monotonic() - started, pressure.get("lag_seconds", 0.0)))
                        await asyncio.sleep(0.5)
                finally:
                    await asyncio.to_thread(watch.close)
                return await load

        outcomes = asyncio.run(step())
        statuses = {o.reply.status if o.reply else "lost" for o in outcomes}
        assert statuses <= {"ok", "queue_full"}, statuses  # answered, or refused: none lost
        assert peak >= 3, f"the workers grew only to {peak}"
        peak_lag = max(s for _, s in lag_seconds)
        settled = [s for t, s in lag_seconds if STEP_S - SETTLED_S <= t <= STEP_S]
        print(f"AUTOSCALE lag seconds over the step: {[round(s, 1) for _, s in lag_seconds]}")
        # the grown group keeps up with three times one worker's load: by the step's
        # last seconds its lag in seconds is back under the target, load still coming
        assert settled and max(settled) < TARGET_S, f"lag seconds {settled} at the step's end"
        print(f"AUTOSCALE peak workers {peak}, peak lag {peak_lag:.1f}s")
        wait_for(lambda: workers(state_file) < peak, 60, "the workers to shrink after the load stopped")
        log = (tmp_path / ".tidegate" / "logs" / "autoscaler.log").read_text()
        assert "scale out" in log and "scale in" in log
    finally:
        down = run(["dev", "down"], tmp_path)
        assert down.returncode == 0, down.stderr
