"""A pool's circuit breaker: closed, open or half-open, judged by the lag monitor.

The monitor runs one `Breaker` per pool of the fleet and publishes its state in the
pool's PressureState (`circuit`, `circuit_until_ms`, `probes`, `circuit_reason`):
routers (the processors, clients) only read it, so every process routes by the
same breaker, shared through Kafka, not one per process's memory.

    CLOSED --failure--> OPEN --cool-down over--> HALF_OPEN --`probes` ok replies--> CLOSED
                         ^                          |
                         +-------- failure ---------+   (cool-down doubled, bounded)

Failures (the `reason` an open circuit gives):
- `errors`: over the sliding window (CIRCUIT_WINDOW_S) the pool's workers answered
  at least CIRCUIT_MIN_REPLIES, and CIRCUIT_ERROR_RATIO of them or more were `error`
  replies (their WorkerOutcomes records, inference/outcomes.py);
- `stalled`: half or more of the pool's partitions with lag are STALL or STOP by
  Burrow's rules (ops/burrow.py): its workers hang, or are gone, on most of its work
  (a timeout, in a queue's terms). One long generation on one partition is not;
- `no_members`: its group has had no member for EMPTY_S while work waits (lag > 0).
  Held that long because a member count is asked every few seconds: a count from just
  before the first worker joined, beside the lag of the work it was about to take,
  opened the circuit of a pool that had just come up (the monitor asks again within a
  second while a group with work reads empty). On Tansu, which lists no members,
  `stalled` stands in once the health window passed.

`expired` replies are no failure: a pool that queues work past its deadlines is
full, not broken (backpressure's `full` covers it), and a pool recovering from an
outage answers its queued, expired requests first: counted as failures, they kept
its circuit from ever closing. Caller cancellations are `expired` replies too.

Open: for the cool-down (CIRCUIT_OPEN_S, doubled at each opening in a row up to
CIRCUIT_OPEN_MAX_S; the run is forgotten once the circuit has stayed closed for
CIRCUIT_OPEN_MAX_S). While open nothing is lost: requests already queued in the
pool wait in its contexts topic for its workers (docs/design.md: never re-routed),
and only new ones are routed elsewhere. When the cool-down ends with the group
still empty and work waiting, the circuit stays open (probes would only queue
behind the work nobody serves) and half-opens at the first sample with a member
back: an empty group is seen ending, so it is waited out without longer cool-downs
(doubled each time the workers were still away, a pool down two minutes would stay
open up to two more after they came back). Its `circuit_until_ms` then moves on by
CIRCUIT_OPEN_S at a time, a retry hint for the routers' refusals.

Half-open: routers send up to `probes` requests each. `probes` ok replies with no
error close it, once the pool is not `stalled` (closed while stalled, it opened again
at the next sample: a flap, its cool-down doubled); an error, or the group empty with
work waiting, or no progress (`stalled`) for as long as the health window, opens it
again. Burrow's STOP and
STALL are not judged at once here: they clear only with the pool's first commit
after it came back.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ops.burrow import STALL, STOP
from streams.config import Settings

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
CIRCUIT_CODES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # tidegate_circuit_state
ERRORS, STALLED, NO_MEMBERS = "errors", "stalled", "no_members"
REASONS = (ERRORS, STALLED, NO_MEMBERS)
STALL_SHARE = 0.5  # of the partitions with lag, STALL or STOP: the pool makes no progress
EMPTY_S = 2.0  # no member, with work waiting, for this long (two of the monitor's fresh counts)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    window_s: float = 30.0
    min_replies: int = 20
    error_ratio: float = 0.5
    open_s: float = 10.0
    open_max_s: float = 120.0
    probes: int = 5
    half_open_stall_s: float = 30.0  # the health window: no progress that long in half-open
    empty_s: float = EMPTY_S

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerConfig:
        return cls(
            settings.circuit_window_s,
            settings.circuit_min_replies,
            settings.circuit_error_ratio,
            settings.circuit_open_s,
            max(settings.circuit_open_s, settings.circuit_open_max_s),
            settings.circuit_probes,
            settings.health_window_s,
        )


@dataclass(frozen=True, slots=True)
class Signals:
    """What the monitor measured of the pool at a sample."""

    lag: int
    members: int  # -1: unknown (Tansu)
    stalled: bool  # `stalled_share` of its partitions


@dataclass(frozen=True, slots=True)
class Circuit:
    """The breaker's state as the pool's PressureState carries it."""

    state: str
    until_ms: int = 0  # open: when it half-opens
    probes: int = 0  # half-open: requests each router may send
    reason: str = ""  # open and half-open: why it opened

    def fields(self) -> dict[str, object]:
        return {
            "circuit": self.state,
            "circuit_until_ms": self.until_ms,
            "probes": self.probes,
            "circuit_reason": self.reason,
        }


def stalled(statuses: Mapping[str, str], lags: Mapping[str, int], share: float = STALL_SHARE) -> bool:
    """Whether `share` or more of the partitions with lag are STALL or STOP."""
    lagging = [p for p, lag in lags.items() if lag > 0]
    stuck = [p for p in lagging if statuses.get(p) in (STALL, STOP)]
    return bool(stuck) and len(stuck) >= share * len(lagging)


class Breaker:
    """One pool's circuit. `record` takes its workers' outcome counts as they come,
    `update` judges the pool at each of the monitor's samples. `clock` is wall-clock
    seconds (the published `circuit_until_ms` is wall-clock too)."""

    def __init__(
        self,
        config: BreakerConfig,
        clock: Callable[[], float] = time.time,
        on_open: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.on_open = on_open
        self.state = CLOSED
        self.reason = ""
        self.until = 0.0
        self.opens_in_row = 0
        self._changed_at = clock()
        self._window: collections.deque[tuple[float, int, int]] = collections.deque()  # (at, ok, errors)
        self._probe_ok = 0  # half-open: ok replies since it half-opened
        self._probe_errors = 0
        self._empty_since: float | None = None  # no member with work waiting, since
        self._waiting = False  # open past its cool-down for a member to come back

    def record(self, ok: int, errors: int, expired: int = 0) -> None:
        """A worker's counts for its last interval (`expired` is no failure: see above)."""
        if self.state == HALF_OPEN:
            self._probe_ok += ok
            self._probe_errors += errors
        elif self.state == CLOSED and (ok or errors):
            self._window.append((self.clock(), ok, errors))

    def error_ratio(self) -> tuple[float, int]:
        """(error share, replies) over the window, the window trimmed to now."""
        horizon = self.clock() - self.config.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()
        ok = sum(o for _, o, _ in self._window)
        errors = sum(e for _, _, e in self._window)
        total = ok + errors
        return (errors / total if total else 0.0), total

    def update(self, signals: Signals) -> Circuit:
        now = self.clock()
        empty = self._empty(signals, now)
        if self.state == CLOSED:
            if self.opens_in_row and now - self._changed_at >= self.config.open_max_s:
                self.opens_in_row = 0  # closed long enough: the next opening starts short again
            ratio, replies = self.error_ratio()
            if empty:
                self._open(NO_MEMBERS, now)
            elif signals.stalled:
                self._open(STALLED, now)
            elif replies >= self.config.min_replies and ratio >= self.config.error_ratio:
                self._open(ERRORS, now)
        elif self.state == OPEN:
            if now >= self.until and empty:  # cool-down over, nobody to take a probe: no opening counted
                self.until = now + self.config.open_s
                self._waiting = True
            elif now >= self.until or (self._waiting and not empty):  # over, or a member is back
                self._set(HALF_OPEN, now)
                self._probe_ok = self._probe_errors = 0
        elif self._probe_errors:
            self._open(ERRORS, now)
        elif empty:
            self._open(NO_MEMBERS, now)
        elif signals.stalled and now - self._changed_at >= self.config.half_open_stall_s:
            self._open(STALLED, now)
        elif self._probe_ok >= self.config.probes and not signals.stalled:
            self._set(CLOSED, now)
            self.reason = ""
            self._window.clear()
        return self.circuit()

    def resume(self, state: str, until: float, reason: str) -> None:
        """Starts from the state an earlier monitor published (open until `until`, or
        half-open), as one opening in a row: a restart neither closes a broken pool's
        circuit nor shortens its next cool-down to nothing. `until` is another host's
        wall clock (or whoever wrote the pressure topic's): at most the longest
        cool-down from now."""
        if state not in (OPEN, HALF_OPEN):
            return
        now = self.clock()
        self.opens_in_row = max(1, self.opens_in_row)
        self.reason = reason
        self.until = min(until, now + self.config.open_max_s)
        self._set(state, now)
        self._probe_ok = self._probe_errors = 0
        self._window.clear()

    def _empty(self, signals: Signals, now: float) -> bool:
        """No member, with work waiting, for `empty_s` or longer."""
        if signals.members != 0 or signals.lag <= 0:
            self._empty_since = None
            return False
        if self._empty_since is None:
            self._empty_since = now
        return now - self._empty_since >= self.config.empty_s

    def circuit(self) -> Circuit:
        if self.state == OPEN:
            return Circuit(OPEN, int(self.until * 1000), 0, self.reason)
        if self.state == HALF_OPEN:
            return Circuit(HALF_OPEN, 0, self.config.probes, self.reason)
        return Circuit(CLOSED)

    def cool_down_s(self) -> float:
        """The cool-down of the opening in row `opens_in_row` (1: the first)."""
        return min(self.config.open_max_s, self.config.open_s * 2 ** max(0, self.opens_in_row - 1))

    def _open(self, reason: str, now: float) -> None:
        self.opens_in_row += 1
        self.reason = reason
        self.until = now + self.cool_down_s()
        self._set(OPEN, now)
        self._window.clear()  # what it answered before it opened is judged no more
        if self.on_open is not None:
            self.on_open(reason)

    def _set(self, state: str, now: float) -> None:
        self.state = state
        self._changed_at = now
        self._waiting = False  # open past its cool-down for a member to come back
