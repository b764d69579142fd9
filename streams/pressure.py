"""Pressure: each stage's lag against its cap, as ok / warn / full, and who may send.

`PressureGauge` (in the lag monitor) turns lag samples into a PressureState with
hysteresis and a measured drain rate. `PressureBoard` (in clients and processors)
keeps the latest state per stage in memory and decides, without touching the
broker, whether a request of a given priority may enter.

Admission rules (per stage on the request's path):
- `low` is shed at `warn` (lag >= warn_ratio x cap), `normal` at `full` (lag >= cap),
  `high` only past 1.25 x cap.
- Between two published states, the board adds the requests it let through itself
  that the last state cannot have counted yet (admitted later than `TRANSIT_MS`
  before it was measured, `FORWARD_TRANSIT_MS` in the processors, and within
  `ADMISSION_MEMORY_MS`), so a burst is cut at the cap, not one update after it.
  A client forgets a request it admitted once its reply came (`settle`): it is in
  nobody's lag any more. (Counted until a later state, a caller asking one request
  at a time, ~120 a second on the echo model, counted ~60 of its own answered
  requests and refused itself at the minimum cap of 64.)
- A stage with no update for `pressure_stale_s` counts as `full` for `low` and
  `warn` for the rest (so `normal` and `high` still pass).

Retry hints: a refusal's `retry_after_ms` is when the backlog will have drained
below the line that lets its priority in, *and* the callers told to come back
before it have had their turn: successive refusals are given times one drain
interval (1 / drain rate) apart. Told the same drain time, every refused caller
came back at once, most were refused again, with a 50 ms hint each time while
the state was not yet `full` (6,300-8,200 429s for ~2,300 calls in the HTTP
overload test, and the CPU they took delayed the answers). The line starts again
when a published state is back to `ok`: the backlog drained, every priority gets
in, and a caller refused later is told the drain time, not a place behind callers
refused before who may never come back. Kept for good, a storm of refusals from
callers who never came back pushed every later hint to MAX_RETRY_AFTER_MS even
once the backlog had drained. (Started again at every drop of a level, full ->
warn, the line was lost many times a second under a 3x overload and the returning
callers met in herds again: 10,674 429s instead of 2,249 in the HTTP overload test.)
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

from streams.config import Settings
from streams.outgoing import now_ms
from streams.pauses import PoolPauses

OK, WARN, FULL = "ok", "warn", "full"
HIGH_PRIORITY_FACTOR = 1.25
# hysteresis: a state is left only when lag falls this far below the line that set it
EXIT_FACTOR = 0.9
MIN_RETRY_AFTER_MS = 50
MAX_RETRY_AFTER_MS = 30_000
DEFAULT_RETRY_AFTER_MS = 1000
# A request let through this long before a state was measured is assumed to be in its
# lag. From a client it first crosses the processors (p99 ~110 ms under overload),
# then reaches the published lag once the monitor's tail fetched it (up to ~100 ms:
# Tansu re-checks a waiting fetch at half the remaining wait).
TRANSIT_MS = 300
# From the processors' board, which counts what it forwarded: on the contexts topic
# within milliseconds. With one transit for both (150 ms), the processors counted
# forwards the published lag already held, and near the cap refused what the clients
# had let through (2,200-2,600 `queue_full` replies per overload run; 90 at 50 ms),
# while the clients forgot admissions still in the processors' hop.
FORWARD_TRANSIT_MS = 50
# an admission older than this is in the lag by now, or was refused downstream:
# the monitor measures at least every pressure interval while anything changes
ADMISSION_MEMORY_MS = 600
# a pool whose state has not come for this long is no longer part of the fleet a client
# or gateway learns from the states (removed from the fleet file); far longer than a
# monitor's restart, so a hiccup never drops a pool
FORGET_STAGE_S = 60.0


@dataclass(frozen=True, slots=True)
class StageCap:
    """A cap as a message count, or as seconds of work at the measured drain rate.

    A seconds-cap starts at `floor` and grows with the share of the rate window
    measured so far (`confidence`): a rate from the first second of work is noisy,
    and a cap that jumps up on it and back down leaves admitted work past the cap.
    """

    messages: int | None
    seconds: float
    floor: int

    def resolve(self, drain_rate: float, confidence: float = 1.0) -> int:
        if self.messages is not None:
            return self.messages
        return max(self.floor, int(self.seconds * drain_rate * min(1.0, confidence)))


FLOOR_BATCHES = 4  # a seconds-cap's floor, in the stage's own batches
SPELL_SLACK_S = 1e-6  # sample intervals that add up to a drain-rate spell, give or take float rounding


def stage_caps(settings: Settings) -> dict[str, StageCap]:
    """A seconds-cap is never below FLOOR_BATCHES of the stage's own batches: that much
    lag is normal work in hand. For the processors it also covers what they finished since
    their last commit (every PROCESSOR_COMMIT_INTERVAL_MS): at the workers' 4 x
    MAX_BATCH (64) the processors' stage read `full` at 150 requests/s whenever their
    measured rate dipped, and refused requests the workers had room for."""
    return {
        "processors": StageCap(
            settings.processors_cap_messages, settings.processors_cap_seconds, settings.processor_batch * FLOOR_BATCHES
        ),
        "workers": StageCap(
            settings.workers_cap_messages, settings.workers_cap_seconds, settings.max_batch * FLOOR_BATCHES
        ),
    }


class PressureGauge:
    """One stage's state machine: lag samples in, PressureState records out.

    The drain rate is what the stage commits while it has work: only sample
    intervals that began with a backlog count. An idle or starved stage therefore
    keeps the rate it showed when busy, and a seconds-cap reflects what the stage
    can do, not what it was offered. It is the rate of the slowest `short_s` spell
    in the last `window_s` of busy time: a seconds-cap is a promise that admitted
    work drains within its seconds, so it is set from a pace the stage kept all
    through the window, not from its average. Spells are consecutive, fixed
    stretches of busy time, so the rate changes only when a spell ends: the cap
    follows a slowdown once the spell holding it ends, and grows back only once that
    spell left the window. (Spells counted back from each newest sample slid across
    a slow stretch, a cold start, and swung the cap between 489 and 818 within a
    second, below the lag it had just admitted.) Before the first spell ends the rate
    is the average so far, and until `window_s` of busy time has been seen a
    seconds-cap ramps up from its floor in proportion (StageCap.resolve).
    """

    def __init__(
        self, stage: str, cap: StageCap, warn_ratio: float, window_s: float = 15.0, short_s: float = 5.0
    ) -> None:
        self.stage = stage
        self.cap = cap
        self.warn_ratio = warn_ratio
        self.window_s = window_s
        self.short_s = short_s
        self.state = OK
        self.drain_rate = 0.0
        self.busy_s = 0.0  # busy time behind the drain rate, up to window_s
        self._last: tuple[float, int, int] | None = None  # (at, committed, lag)
        self._spell = (0.0, 0)  # the spell being measured: (busy seconds, committed)
        # the ended spells in the window: (busy seconds, committed)
        self._spells: collections.deque[tuple[float, int]] = collections.deque(maxlen=max(1, round(window_s / short_s)))

    def update(self, lag: int, committed: int, at: float | None = None) -> dict[str, Any]:
        at = time.monotonic() if at is None else at
        if self._last is not None:
            last_at, last_committed, last_lag = self._last
            if last_lag > 0 and at > last_at:
                busy, done = self._spell
                self._spell = (busy + at - last_at, done + committed - last_committed)
                if self._spell[0] >= self.short_s - SPELL_SLACK_S:
                    self._spells.append(self._spell)
                    self._spell = (0.0, 0)
                self.busy_s = min(self.window_s, self._spell[0] + sum(b for b, _ in self._spells))
                if self.busy_s >= 0.5:
                    self.drain_rate = max(0.0, self._slowest_spell())
        self._last = (at, committed, lag)
        cap = self.cap.resolve(self.drain_rate, self.busy_s / self.window_s)
        self.state = self._next_state(lag, cap)
        drain_ms = int(lag / self.drain_rate * 1000) if self.drain_rate > 0 else (0 if lag == 0 else -1)
        return {
            "stage": self.stage,
            "lag": lag,
            "cap": cap,
            "state": self.state,
            "drain_rate": round(self.drain_rate, 3),
            "drain_time_ms": drain_ms,
            "updated_ms": now_ms(),
        }

    def _slowest_spell(self) -> float:
        """Commits per second of the slowest ended spell in the window (of the spell
        being measured while none has ended)."""
        if not self._spells:
            busy, done = self._spell
            return done / busy
        return min(done / busy for busy, done in self._spells)

    def _next_state(self, lag: int, cap: int) -> str:
        warn_at = self.warn_ratio * cap
        if lag >= cap:
            return FULL
        if self.state == FULL and lag >= EXIT_FACTOR * cap:
            return FULL
        if lag >= warn_at:
            return WARN
        if self.state in (FULL, WARN) and lag >= EXIT_FACTOR * warn_at:
            return WARN
        return OK


def retry_after_ms(lag: float, target: float, drain_rate: float) -> int:
    """How long until the backlog drains below `target` at `drain_rate`."""
    if drain_rate <= 0:
        return DEFAULT_RETRY_AFTER_MS
    wait = (lag - target) / drain_rate * 1000
    return int(min(MAX_RETRY_AFTER_MS, max(MIN_RETRY_AFTER_MS, wait)))


@dataclass(frozen=True, slots=True)
class Refusal:
    stage: str
    lag: int
    cap: int
    retry_after_ms: int


class PressureBoard:
    """The latest PressureState per stage, plus what this process let through since."""

    def __init__(self, stale_s: float, warn_ratio: float, transit_ms: int = TRANSIT_MS) -> None:
        self.stale_s = stale_s
        self.warn_ratio = warn_ratio
        self.transit_ms = transit_ms
        self._states: dict[str, dict[str, Any]] = {}
        self._received_at: dict[str, float] = {}
        # per stage: request id (or a number) -> when it was let through, oldest first
        self._admitted: dict[str, collections.OrderedDict[str | int, int]] = collections.defaultdict(
            collections.OrderedDict
        )
        self._admissions = itertools.count()  # ids for admissions made without one
        self._last_retry_ms: dict[str, float] = {}  # per stage: the latest retry time handed out
        self._lock = threading.Lock()
        # pools their provider asked to wait (PoolPause records, streams/pauses.py): the
        # routers treat them as full until then
        self.pauses = PoolPauses()

    def publish(self, state: dict[str, Any]) -> None:
        """Takes a PressureState read from the pressure topic (older ones are ignored)."""
        stage = state["stage"]
        with self._lock:
            current = self._states.get(stage)
            if current is not None and current["updated_ms"] > state["updated_ms"]:
                return
            if state["state"] == OK and current is not None and current["state"] != OK:
                self._last_retry_ms.pop(stage, None)  # drained: the line of retry times starts again
            self._states[stage] = state
            self._received_at[stage] = time.monotonic()
            _forget_before(self._admitted[stage], state["updated_ms"] - self.transit_ms)

    def state(self, stage: str) -> dict[str, Any] | None:
        with self._lock:
            return self._states.get(stage)

    def fresh(self, stage: str) -> bool:
        """Whether the stage's latest state came within PRESSURE_STALE_S: a stale one
        says nothing of now (its monitor is gone, or cut off from this process)."""
        with self._lock:
            at = self._received_at.get(stage)
            return at is not None and time.monotonic() - at <= self.stale_s

    def states(self, within_s: float | None = None) -> list[dict[str, Any]]:
        """The latest state of every stage seen (a fleet's pools among them); with
        `within_s`, only those received that recently (a pool removed from the fleet
        is published no more, and is forgotten after it)."""
        with self._lock:
            if within_s is None:
                return list(self._states.values())
            now = time.monotonic()
            return [s for stage, s in self._states.items() if now - self._received_at[stage] <= within_s]

    def admitted(self, stage: str) -> int:
        """Requests this process let through to `stage` that its latest state may not
        count yet: the router's `admitted since` in a pool's expected wait."""
        with self._lock:
            admitted = self._admitted[stage]
            _forget_before(admitted, now_ms() - ADMISSION_MEMORY_MS)
            return len(admitted)

    def check(self, stages: list[str], priority: str) -> Refusal | None:
        """A Refusal for the first stage on the path that is too full for `priority`
        (its retry time is not handed out: the next refusal may get the same)."""
        return self._decide(stages, priority, count=False)

    def admit(self, stages: list[str], priority: str, request_id: str | None = None) -> Refusal | None:
        """check(), and count the request as sent when it passes, or hand out its
        retry time when it does not."""
        return self._decide(stages, priority, count=True, request_id=request_id)

    def settle(self, request_id: str) -> None:
        """The request admitted as `request_id` was answered: it is in no stage's lag."""
        with self._lock:
            for admitted in self._admitted.values():
                admitted.pop(request_id, None)

    def retry_after(self, stage: str, lag: float, target: float, drain_rate: float) -> int:
        """The time handed out to a caller refused while `stage`'s backlog is `lag`:
        when it will have drained to `target` or, if later, one drain interval after
        the time handed out last for the stage, so the callers refused before come
        back first, one per interval, and each finds room (see the module docstring)."""
        with self._lock:
            return self._retry_after(stage, lag, target, drain_rate, hand_out=True)

    def _retry_after(self, stage: str, lag: float, target: float, drain_rate: float, hand_out: bool) -> int:
        wait_ms = retry_after_ms(lag, target, drain_rate)
        if drain_rate <= 0:
            return wait_ms
        now = now_ms()
        at = max(now + wait_ms, self._last_retry_ms.get(stage, 0.0) + 1000 / drain_rate)
        at = min(at, now + MAX_RETRY_AFTER_MS)
        if hand_out:
            self._last_retry_ms[stage] = at
        return max(MIN_RETRY_AFTER_MS, int(at - now))

    def _decide(self, stages: list[str], priority: str, count: bool, request_id: str | None = None) -> Refusal | None:
        now = time.monotonic()
        with self._lock:
            for stage in stages:
                refusal = self._check_stage(stage, priority, now, count)
                if refusal is not None:
                    return refusal
            if count:
                at = now_ms()
                key = request_id if request_id is not None else next(self._admissions)
                for stage in stages:
                    self._admitted[stage][key] = at
        return None

    def _check_stage(self, stage: str, priority: str, now: float, hand_out: bool) -> Refusal | None:
        _forget_before(self._admitted[stage], now_ms() - ADMISSION_MEMORY_MS)
        state = self._states.get(stage)
        if state is None or now - self._received_at[stage] > self.stale_s:
            if priority == "low":  # stale or never seen: full for low, warn for the rest
                lag, cap = (state["lag"], state["cap"]) if state else (0, 0)
                return Refusal(stage, lag, cap, DEFAULT_RETRY_AFTER_MS)
            return None
        cap = state["cap"]
        lag = state["lag"] + len(self._admitted[stage])
        published = state["state"]
        if priority == "high":
            line = HIGH_PRIORITY_FACTOR * cap
            refuse = lag >= line
        elif priority == "normal":
            line = cap
            refuse = published == FULL or lag >= line
        else:
            line = self.warn_ratio * cap
            refuse = published in (WARN, FULL) or lag >= line
        if not refuse:
            return None
        # retry once the backlog is back under the line that lets this priority in
        target = EXIT_FACTOR * line if published != OK else line
        return Refusal(stage, lag, cap, self._retry_after(stage, lag, target, state["drain_rate"], hand_out))


def _forget_before(admitted: collections.OrderedDict[str | int, int], cutoff_ms: float) -> None:
    """Drops the admissions made before `cutoff_ms` (they are oldest first)."""
    while admitted and next(iter(admitted.values())) < cutoff_ms:
        admitted.popitem(last=False)
