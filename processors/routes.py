"""The processors' side of routing: each request's pool chosen by the Router
(streams/routing.py) as it is admitted, and the fleet the processors route over.

`pool_admission` gives the admission gate (processors/admission.py) its three
callables, all through one Router over the fleet file's pools and the pressure
board: the admission (a Route, counted on its pool, or a NoRoute with the earliest
retry of every pool that could serve), the release (a request taken back: off its
pool's count, and its half-open probe free again), and the near-full check (every
pool that could serve past its warn line: fair shares apply).
"""

from __future__ import annotations

import logging
from typing import Any

from processors.admission import Admission, NearFull, Release
from streams import metrics
from streams.config import Settings
from streams.fleet import Fleet, FleetError, default_fleet, load_fleet
from streams.pressure import PressureBoard
from streams.routing import PRESSURE, NoRoute, Route, Router

log = logging.getLogger(__name__)
FLEET_ERROR_EXIT = 2


def admission_key(request: dict[str, Any]) -> str:
    """What an admission is counted as: request ids are the callers', so two tenants'
    may be the same."""
    return f"{request['tenant']}\x00{request['request_id']}"


def fleet_or_exit(settings: Settings) -> Fleet:
    """The fleet the processors route over; a wrong fleet file ends the process with
    one line per mistake (FleetError) and exit status 2, not a traceback."""
    try:
        fleet = load_fleet(settings)
    except FleetError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(FLEET_ERROR_EXIT) from None
    allow_fleet_labels(fleet)
    return fleet


def allow_fleet_labels(fleet: Fleet) -> None:
    """The fleet's pool stages and model ids become label values (refusals by stage,
    fallbacks by model): the deployment's own names, never a request's."""
    metrics.allow_label_values("stage", [pool.stage for pool in fleet.pools.values()])
    metrics.allow_label_values("model", list(fleet.models))


def pool_admission(router: Router) -> tuple[Admission, Release, NearFull]:
    """The admission gate's callables over `router`: every request routed, counted on
    its pool as it passes; producers that ignore the client-side signal are still
    stopped here."""

    def admit(request: dict[str, Any]) -> Route | NoRoute:
        model, fallbacks = request.get("model") or "", request.get("fallbacks") or ()
        return router.route(model, fallbacks, request["priority"], admission_key(request))

    def release(request: dict[str, Any]) -> None:
        router.release(admission_key(request))

    def near_full(request: dict[str, Any]) -> tuple[str, int] | None:
        return router.near_full(request.get("model") or "", request.get("fallbacks") or ())

    return admit, release, near_full


def downstream_admission(board: PressureBoard, fleet: Fleet | None = None) -> tuple[Admission, Release]:
    """The admission and its release over `fleet` (default: the one-pool fleet of the
    default settings, stage `workers`), for callers that build a handler by hand."""
    admit, release, _ = pool_admission(Router(fleet or default_fleet(Settings()), board, PRESSURE))
    return admit, release
