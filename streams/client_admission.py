"""The client's admission: a request is refused before anything is sent when the
path's stages are full for its priority, as the pressure board read off the pressure
topic says (streams/pressure_feed.py, streams/pressure.py): no broker round trip.

`admit` counts an admitted request on the board until its reply settles it (the
client calls `board.settle`); `check` only asks.
"""

from __future__ import annotations

import asyncio
from typing import Any

from streams import metrics
from streams.client_requests import retry_delay_ms
from streams.exceptions import QueueFull
from streams.lag import PROCESSORS, WORKERS
from streams.outgoing import now_ms
from streams.pressure import PressureBoard

PATH = [PROCESSORS, WORKERS]  # the stages every request passes


def check(board: PressureBoard, priority: str) -> None:
    """Raises QueueFull if a request of `priority` would be refused now (nothing is counted)."""
    refusal = board.check(PATH, priority)
    if refusal is not None:
        raise QueueFull(refusal.stage, refusal.lag, refusal.cap, refusal.retry_after_ms)


async def admit(board: PressureBoard, request: dict[str, Any], wait: bool) -> None:
    """Raises QueueFull at once when the path is full for the request's priority;
    with `wait`, retries at each refusal's retry time until the deadline."""
    while True:
        refusal = board.admit(PATH, request["priority"], str(request["request_id"]))
        if refusal is None:
            return
        error = QueueFull(refusal.stage, refusal.lag, refusal.cap, refusal.retry_after_ms)
        metrics.REFUSALS.labels(refusal.stage, request["priority"], "queue_full").inc()
        metrics.RETRY_AFTER.labels(refusal.stage).observe(refusal.retry_after_ms / 1000)
        if not wait:
            raise error
        delay_ms = retry_delay_ms(refusal.retry_after_ms)
        if request["deadline_ms"] and now_ms() + delay_ms >= request["deadline_ms"]:
            raise error
        await asyncio.sleep(delay_ms / 1000)
