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

ONE_WORKER_RPS = 40.0  # sim:50, batches of 16 rows of 8 tokens: 16 / 0.4 s
TARGET_S = 4.0  # WORKERS_CAP_SECONDS, the autoscaler's target


def workers(state_file: Path) -> int:
    found = json.loads(state_file.read_text())["pids"]["worker"]
    return len(found) if isinstance(found, list) else 1


@pytest.mark.timeout(300)
def test_a_load_step_grows_the_workers_and_they_shrink_after(tmp_path: Path) -> None:
    up = run(
        [
            "dev",
            "up",
            "--model",
            "sim:50",
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
                await offer_load(client, "base", 5.0, ONE_WORKER_RPS)
                load = asyncio.create_task(offer_load(client, "step", 45.0, 3 * ONE_WORKER_RPS))
                watch = PressureListener(settings)
                await asyncio.to_thread(watch.start)
                try:
                    while not load.done():
                        peak = max(peak, workers(state_file))
                        pressure = watch.board.state("workers") or {}
                        lag_seconds.append((time.monotonic(), pressure.get("lag_seconds", 0.0)))
                        await asyncio.sleep(0.5)
                finally:
                    await asyncio.to_thread(watch.close)
                return await load

        outcomes = asyncio.run(step())
        statuses = {o.reply.status if o.reply else "lost" for o in outcomes}
        assert statuses <= {"ok", "queue_full"}, statuses  # answered, or refused: none lost
        assert peak >= 3, f"the workers grew only to {peak}"
        peak_lag = max(s for _, s in lag_seconds)
        # once the grown group has drained the step, the lag in seconds is back under the
        # target (under the step itself it stays above it on the 2-core development
        # machine: issue "Operators" says so)
        watch = PressureListener(settings)
        watch.start()
        try:
            wait_for(
                lambda: (watch.board.state("workers") or {}).get("lag_seconds", TARGET_S) < TARGET_S,
                30,
                f"the workers' lag in seconds back under {TARGET_S}s",
            )
        finally:
            watch.close()
        print(f"AUTOSCALE peak workers {peak}, peak lag {peak_lag:.1f}s")
        wait_for(lambda: workers(state_file) < peak, 60, "the workers to shrink after the load stopped")
        log = (tmp_path / ".tidegate" / "logs" / "autoscaler.log").read_text()
        assert "scale out" in log and "scale in" in log
    finally:
        down = run(["dev", "down"], tmp_path)
        assert down.returncode == 0, down.stderr
