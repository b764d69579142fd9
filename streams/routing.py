"""Routing by pressure: which pool of the fleet takes a request, or why none can now.

The processors route every request here (processors/routes.py), and the client asks
the same question before it sends (streams/client_admission.py), both over the
PressureBoard they keep from the pressure topic: one state per pool, keyed by its
stage (streams/fleet.py).

For a request's candidates (the model it names, then its fallbacks or the model's
default chain: `Fleet.candidates`), in order, the first candidate with a pool that
can take the request wins; among that candidate's pools, the least expected wait:

    (lag + admitted since the state + 1) / drain rate

(the wait for the request itself: what is queued ahead of it, what this process sent
since, and itself). A pool with no measured drain rate yet has its weight stand in
for the rate, so idle pools are tried heaviest first, and a burst spreads over the
pools as its own admissions lengthen each one's wait. A pool whose group has no
member (its fresh state's `members` 0) drains nothing and comes last, so work waits
there for workers only where no other pool of the model has room. A pool can take a
request when the PressureBoard lets its priority in (`low` shed at warn, `normal` at
full, `high` past 1.25 x cap; a pool with no state, or a stale one, passes normal and
high) and its circuit (ops/breaker.py, published in the pool's state) is not open. Half-open,
a pool takes at most `probes` requests from this router per published state. A stale
state holds no circuit: the monitor that judges it is gone, and an allowance per
published state would have let one probe through and refused the pool until the
monitor came back; backpressure's rule for a stale state (normal and high pass) stands.

A pool its provider paused (a 429's wait, shared as a PoolPause: streams/pauses.py)
is full until the pause ends: `low` and `normal` requests are refused there with a
retry time of the pause left plus, where its backlog is past the line too, its drain
time; `high` ones pass as they pass a full pool (up to 1.25 x cap), and wait in it.

When the winner is not the first candidate the route says why the first was passed
over: `circuit_open` when every pool of it was open-circuited, else `full`. When no
pool of any candidate can take it, the refusal carries the EARLIEST retry among all
of them (an open circuit counts with its time until half-open): any one of them
would serve the caller, so it should come back when the first frees up.

ROUTING=round_robin rotates among a model's pools that can take the request
instead (the benchmark's baseline); the admission rules are the same.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streams.exceptions import TidegateError
from streams.fleet import Fleet, ModelSpec, Pool
from streams.outgoing import now_ms
from streams.pressure import (
    DEFAULT_RETRY_AFTER_MS,
    EXIT_FACTOR,
    MAX_RETRY_AFTER_MS,
    MIN_RETRY_AFTER_MS,
    OK,
    PressureBoard,
    retry_after_ms,
)

FULL_REASON = "full"
CIRCUIT_OPEN = "circuit_open"
PAUSED = "paused"  # a pool's provider asked it to wait: full until then (a fallback's reason: `full`)
# a paused pool's retry time is the provider's wait, not capped at the drain hints' 30 s
# (inference/rate_limits.py MAX_PAUSE_S bounds the wait itself)
MAX_PAUSED_RETRY_MS = 600_000
# why a fallback served a request; `error` is kept for the engines that fail over
FALLBACK_REASONS = (FULL_REASON, CIRCUIT_OPEN, "error")
OPEN, HALF_OPEN, CLOSED = "open", "half_open", "closed"
# a half-open pool whose probes this router spent: the next state comes within a
# second (the monitor republishes every stage at least once a second)
PROBES_SPENT_RETRY_MS = DEFAULT_RETRY_AFTER_MS
PRESSURE, ROUND_ROBIN = "pressure", "round_robin"


class UnknownModel(TidegateError):
    """The request names a model that is no id or alias of the fleet."""


@dataclass(frozen=True, slots=True)
class Route:
    """The pool a request goes to, the model that serves it, and, where that is not the
    model asked for, which was asked for and why it was passed over."""

    pool: Pool
    model: ModelSpec
    fallback_from: str | None = None
    fallback_reason: str | None = None


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No pool that could serve the request can take it now; `stage` is the pool with
    the earliest retry, `reason` why that one cannot (`full`, `circuit_open`)."""

    stage: str
    lag: int
    cap: int
    retry_after_ms: int
    reason: str
    pools: int  # the pools that could have served it

    @property
    def why(self) -> str:
        """The `queue_full` reply's error text (one pool: as before fleets)."""
        if self.reason == CIRCUIT_OPEN:
            text = f"stage {self.stage} has its circuit open"
        elif self.reason == PAUSED:
            text = f"stage {self.stage} is paused: its provider asked to wait {self.retry_after_ms} ms"
        else:
            text = f"stage {self.stage} lag {self.lag} is past its cap {self.cap}"
        if self.pools > 1:
            text += f"; all {self.pools} pools that could serve it are full or open-circuited, this one frees first"
        return text


@dataclass(frozen=True, slots=True)
class _Blocked:
    """A pool that cannot take the request now, and when it may."""

    pool: Pool
    index: int  # of the candidate it was looked at for
    lag: int
    cap: int
    retry_after_ms: int
    reason: str


def first_route(fleet: Fleet, model: str, fallbacks: Sequence[str] = ()) -> Route:
    """The route without pressure to go by (backpressure off): the first candidate's
    heaviest pool (the file's first among equals).

    :raises UnknownModel: when `model` is no id or alias of the fleet."""
    candidates = fleet.candidates(model, fallbacks)
    if not candidates:
        raise UnknownModel(f"unknown model {model[:80]!r}")
    spec = candidates[0]
    pools = fleet.pools_of(spec.id)
    return Route(max(pools, key=lambda pool: pool.weight), spec)


class Router:
    """Routes requests over `fleet` by what `board` says of each pool. Holds this
    process's own routing state: half-open probes sent, round-robin turns. `fleet`
    may be replaced (a client learns it from the pools' states)."""

    def __init__(self, fleet: Fleet, board: PressureBoard, mode: str = PRESSURE) -> None:
        self.fleet = fleet
        self.board = board
        self.mode = mode
        self._turns: collections.Counter[str] = collections.Counter()  # model id -> round-robin turn
        # stage -> (updated_ms of the half-open state they were sent under, their keys)
        self._probes: dict[str, tuple[int, set[str | int]]] = {}
        self._keys = itertools.count()  # probe keys for admissions made without a request id
        self._lock = threading.Lock()

    def route(
        self,
        model: str,
        fallbacks: Sequence[str] = (),
        priority: str = "normal",
        request_id: str | None = None,
        count: bool = True,
    ) -> Route | NoRoute:
        """The route for a request, or why none can take it now. `count`: the request
        is counted on the chosen pool (until the board forgets or settles it), and a
        refusal hands out its retry time; without, only asked.

        :raises UnknownModel: when `model` is no id or alias of the fleet."""
        candidates = self.fleet.candidates(model, fallbacks)
        if not candidates:
            raise UnknownModel(f"unknown model {model[:80]!r}")
        with self._lock:
            blocked: list[_Blocked] = []
            passed_over = FULL_REASON
            for index, spec in enumerate(candidates):
                room: list[tuple[Pool, dict[str, Any] | None]] = []  # (pool, its state)
                for pool in self.fleet.pools_of(spec.id):
                    verdict = self._look(pool, index, priority)
                    if isinstance(verdict, _Blocked):
                        blocked.append(verdict)
                    else:
                        room.append((pool, verdict))
                for pool, state in self._order(spec, room):
                    if not count or self._count(pool, state, priority, request_id):
                        if count and self.mode == ROUND_ROBIN:
                            self._turns[spec.id] += 1
                        return self._route(pool, spec, index, candidates, passed_over)
                if index == 0 and blocked and all(b.reason == CIRCUIT_OPEN for b in blocked):
                    passed_over = CIRCUIT_OPEN
            return self._refuse(blocked, priority, request_id, count, candidates, passed_over)

    def release(self, request_id: str) -> None:
        """Takes back the admission counted as `request_id`: it was not forwarded (its
        quota refused it, it was claimed before, it failed alone), so it is in no pool's
        lag, and a half-open probe it took is free again."""
        self.board.settle(request_id)
        with self._lock:
            for _, keys in self._probes.values():
                keys.discard(request_id)

    def near_full(self, model: str, fallbacks: Sequence[str] = ()) -> tuple[str, int] | None:
        """(stage, retry_after_ms) while every pool that could serve the request is past
        its warn line (when admissions are scarce and each tenant is held to its fair
        share), else None; the stage is the one that drains below its line first, and
        its retry time is handed out. Open-circuited pools are left out."""
        soonest: tuple[int, str, dict[str, Any], float] | None = None
        for spec in self.fleet.candidates(model, fallbacks):
            for pool in self.fleet.pools_of(spec.id):
                state = self.board.state(pool.stage)
                if state is not None and self._circuit(pool, state)[0] == OPEN:
                    continue
                if state is None or not state["cap"]:
                    return None
                line = self.board.warn_ratio * state["cap"]
                if state["state"] == OK and state["lag"] < line:
                    return None
                wait = retry_after_ms(state["lag"], EXIT_FACTOR * line, state["drain_rate"])
                if soonest is None or wait < soonest[0]:
                    soonest = (wait, pool.stage, state, line)
        if soonest is None:
            return None
        _, stage, state, line = soonest
        return stage, self.board.retry_after(stage, state["lag"], EXIT_FACTOR * line, state["drain_rate"])

    def _look(self, pool: Pool, index: int, priority: str) -> dict[str, Any] | _Blocked | None:
        """Why the pool cannot take one more request now, or its state (None: none yet)."""
        state = self.board.state(pool.stage)
        lag, cap = (int(state["lag"]), int(state["cap"])) if state is not None else (0, 0)
        if state is not None:
            circuit, until_ms, probes = self._circuit(pool, state)
            if circuit == OPEN:
                wait = until_ms - now_ms() if until_ms else DEFAULT_RETRY_AFTER_MS
                return _Blocked(pool, index, lag, cap, _bounded(wait), CIRCUIT_OPEN)
            if circuit == HALF_OPEN and self._probes_sent(pool.stage, state) >= probes:
                return _Blocked(pool, index, lag, cap, PROBES_SPENT_RETRY_MS, CIRCUIT_OPEN)
        refusal = self.board.check([pool.stage], priority)
        paused_ms = self.board.pauses.remaining_ms(pool.name) if priority != "high" else 0
        if paused_ms > 0:  # full until its provider's wait ends, then its backlog's drain time
            behind = refusal.retry_after_ms if refusal is not None else 0
            return _Blocked(pool, index, lag, cap, min(MAX_PAUSED_RETRY_MS, paused_ms + behind), PAUSED)
        if refusal is not None:
            return _Blocked(pool, index, refusal.lag, refusal.cap, refusal.retry_after_ms, FULL_REASON)
        return state

    def _wait(self, pool: Pool, state: dict[str, Any] | None) -> float:
        """The pool's expected wait in seconds for one more request; without end where
        its fresh state says its group has no member (nobody drains it: it takes a
        request only where no other pool of the model has room)."""
        if state is not None and state.get("members") == 0 and self.board.fresh(pool.stage):
            return math.inf
        lag = state["lag"] if state is not None else 0
        rate = state["drain_rate"] if state is not None and state["drain_rate"] > 0 else pool.weight
        return (lag + self.board.admitted(pool.stage) + 1) / rate

    def _order(
        self, spec: ModelSpec, room: list[tuple[Pool, dict[str, Any] | None]]
    ) -> list[tuple[Pool, dict[str, Any] | None]]:
        """The pools that can take the request, best first: the least expected wait (the
        heavier, then the file's first, among equals), or round robin's turn."""
        if len(room) < 2:
            return room
        if self.mode == ROUND_ROBIN:
            turn = self._turns[spec.id] % len(room)
            return room[turn:] + room[:turn]
        ranked = sorted(enumerate(room), key=lambda e: (self._wait(*e[1]), -e[1][0].weight, e[0]))
        return [entry for _, entry in ranked]

    def _count(self, pool: Pool, state: dict[str, Any] | None, priority: str, request_id: str | None) -> bool:
        """Counts the request on the pool's stage (False: it filled up meanwhile), and
        as a probe where the pool is half-open."""
        if self.board.admit([pool.stage], priority, request_id) is not None:
            return False
        if state is not None and self._circuit(pool, state)[0] == HALF_OPEN:
            self._probes_sent(pool.stage, state)
            self._probes[pool.stage][1].add(request_id if request_id is not None else next(self._keys))
        return True

    def _circuit(self, pool: Pool, state: dict[str, Any]) -> tuple[str, int, int]:
        """The pool's circuit as its state says, closed where that state is stale."""
        return _circuit(state) if self.board.fresh(pool.stage) else (CLOSED, 0, 0)

    def _probes_sent(self, stage: str, state: dict[str, Any]) -> int:
        """Probes this router sent to a half-open pool under its current state: a newer
        state gives a new allowance."""
        sent = self._probes.get(stage)
        if sent is None or sent[0] != state["updated_ms"]:
            sent = self._probes[stage] = (state["updated_ms"], set())
        return len(sent[1])

    def _route(self, pool: Pool, spec: ModelSpec, index: int, candidates: list[ModelSpec], passed_over: str) -> Route:
        if index == 0:
            return Route(pool, spec)
        return Route(pool, spec, candidates[0].id, passed_over)

    def _refuse(
        self,
        blocked: list[_Blocked],
        priority: str,
        request_id: str | None,
        count: bool,
        candidates: list[ModelSpec],
        passed_over: str,
    ) -> Route | NoRoute:
        """The refusal with the earliest retry among the pools that could have served the
        request; counted, a full pool's retry time is handed out (the board's line of
        retry times), and a pool that found room meanwhile takes the request."""
        pools = len({b.pool.stage for b in blocked})
        if not blocked:  # every pool filled up between the look and the count
            return NoRoute("", 0, 0, DEFAULT_RETRY_AFTER_MS, FULL_REASON, 0)
        soonest = min(blocked, key=lambda b: b.retry_after_ms)
        retry = soonest.retry_after_ms
        lag, cap = soonest.lag, soonest.cap
        if count and soonest.reason == FULL_REASON:
            refusal = self.board.admit([soonest.pool.stage], priority, request_id)
            if refusal is None:
                return self._route(soonest.pool, candidates[soonest.index], soonest.index, candidates, passed_over)
            retry, lag, cap = refusal.retry_after_ms, refusal.lag, refusal.cap
        return NoRoute(soonest.pool.stage, lag, cap, retry, soonest.reason, pools)


def _circuit(state: dict[str, Any]) -> tuple[str, int, int]:
    """(circuit, circuit_until_ms, probes) of a pool's state. An open circuit past its
    cool-down counts as half-open with at least one probe: the monitor's half-open
    state is on its way, or the monitor is gone and one probe a state is the safe pace.
    Half-open admits at least one probe, or it could never close."""
    circuit = state.get("circuit") or CLOSED
    until_ms = int(state.get("circuit_until_ms") or 0)
    probes = int(state.get("probes") or 0)
    if circuit == OPEN and until_ms and until_ms <= now_ms():
        circuit = HALF_OPEN
    return circuit, until_ms, max(1, probes) if circuit == HALF_OPEN else probes


def _bounded(wait_ms: float) -> int:
    return int(min(MAX_RETRY_AFTER_MS, max(MIN_RETRY_AFTER_MS, wait_ms)))
