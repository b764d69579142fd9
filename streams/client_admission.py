"""The client's admission: a request is refused before anything is sent when the
path's stages are full for its priority, as the pressure board read off the pressure
topic says (streams/pressure_feed.py, streams/pressure.py): no broker round trip.

With a fleet (streams/fleet.py) the path is the processors, then whichever pool the
processors will route the request to: the client has no fleet file, so it learns the
fleet from the pools' own pressure states (`fleet_from_states`) and asks the same
Router the processors use (streams/routing.py). QueueFull is raised only when every
pool that could serve the request (its model's, then its fallbacks' or the model's
default chain's) is full or open-circuited, with the earliest retry among them (a
request naming no model: every pool of the fleet, since the states do not say which
model the fleet file makes the default). While no state names a pool (no monitor
yet, or one from before fleets) the path is today's: `processors`, `workers`.

`admit` counts an admitted request on the board (on the processors and on the pool
it was routed to) until its reply settles it (the client calls `board.settle`);
`check` only asks.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from streams import metrics
from streams.client_requests import retry_delay_ms
from streams.exceptions import QueueFull
from streams.fleet import fleet_from_states
from streams.lag import PROCESSORS, WORKERS
from streams.outgoing import now_ms
from streams.pressure import FORGET_STAGE_S, PressureBoard, Refusal
from streams.routing import NoRoute, Router, UnknownModel

PATH = [PROCESSORS, WORKERS]  # the stages every request passes without a fleet

# per board: (the pool states the fleet was read from, the router over it); a router
# keeps its half-open probes and turns while the fleet it routes over is read again
_routers: weakref.WeakKeyDictionary[PressureBoard, tuple[tuple[tuple[str, int], ...], Router]] = (
    weakref.WeakKeyDictionary()
)
_routers_lock = threading.Lock()


def router_of(board: PressureBoard) -> Router | None:
    """The router over the fleet the board's pool states describe, or None while no
    state names a pool."""
    states = [state for state in board.states(FORGET_STAGE_S) if state.get("pool")]
    if not states:
        return None
    seen = tuple(sorted((state["stage"], state["updated_ms"]) for state in states))
    with _routers_lock:
        cached = _routers.get(board)
        if cached is not None and cached[0] == seen:
            return cached[1]
        fleet = fleet_from_states(states)
        if fleet is None:
            return None
        if cached is None:
            router = Router(fleet, board)
        else:
            router = cached[1]
            router.fleet = fleet
        _routers[board] = (seen, router)
    metrics.allow_label_values("stage", [pool.stage for pool in fleet.pools.values()])
    return router


def check(board: PressureBoard, priority: str, *, model: str = "", fallbacks: Sequence[str] = ()) -> None:
    """Raises QueueFull if a request of `priority` (for `model`, with `fallbacks`) would
    be refused now (nothing is counted)."""
    refusal = _decide(board, priority, model, fallbacks, None, count=False)
    if refusal is not None:
        raise QueueFull(refusal.stage, refusal.lag, refusal.cap, refusal.retry_after_ms)


async def admit(board: PressureBoard, request: dict[str, Any], wait: bool) -> None:
    """Raises QueueFull at once when the path is full for the request's priority;
    with `wait`, retries at each refusal's retry time until the deadline."""
    model, fallbacks = request.get("model") or "", request.get("fallbacks") or ()
    while True:
        refusal = _decide(board, request["priority"], model, fallbacks, str(request["request_id"]), count=True)
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


def _decide(
    board: PressureBoard, priority: str, model: str, fallbacks: Sequence[str], request_id: str | None, count: bool
) -> Refusal | None:
    """The refusal of the first stage on the path too full for the request, or None
    (counted on the processors and its pool where `count`)."""
    router = router_of(board)
    if router is None:
        if count:
            return board.admit(PATH, priority, request_id)
        return board.check(PATH, priority)
    refusal = board.admit([PROCESSORS], priority, request_id) if count else board.check([PROCESSORS], priority)
    if refusal is not None:
        return refusal
    if not model and not fallbacks and len(router.fleet.models) > 1:
        # which model the fleet file makes the default the pools' states do not say: a
        # request naming none is refused only when no pool of any model has room
        fallbacks = list(router.fleet.models)
    try:
        routed = router.route(model, fallbacks, priority, request_id, count)
    except UnknownModel:  # the processors answer it `invalid`, naming the models served
        return None
    if isinstance(routed, NoRoute):
        if count and request_id is not None:
            board.settle(request_id)  # not sent: off the processors' count again
        return Refusal(routed.stage, routed.lag, routed.cap, routed.retry_after_ms)
    return None
