"""`tidegate autoscale`: adds and removes workers of the dev stack from what the lag
monitor publishes, between a minimum and a maximum, with cooldowns.

Every few seconds it reads the workers' PressureState (lag, lag in seconds, drain
and arrival rates, partitions) and asks ops/scaling.py how many members would keep
up and clear the backlog within the target (the workers' seconds-cap). It scales
out at once when the lag in seconds passes the target or the stage refuses
requests (warn or full: demand past what it drains), and in only after
the lag stayed under half the target for a whole cooldown; each change waits out
its cooldown, so a rebalance has settled and the rates show the new group. In
production the same decision belongs to KEDA or an HPA (deploy/k8s/keda.yaml).

It acts only on a fresh state: one older than PRESSURE_STALE_S (the monitor is gone
or cut off: its last word says nothing about now) or measured before the last change
(the old group's) is passed over. The worker count is read from the dev stack's
state file at each check (`tidegate dev scale` or the supervisor may have changed it).
A scale that fails (the supervisor gone or slow) is logged and tried again after the
out-cooldown; the autoscaler itself never exits on it.

With a fleet (FLEET_FILE, streams/fleet.py) each pool is scaled on its own: its state
on the pressure topic (key `workers.<pool>`; `workers` for the `default` pool) drives
its workers' role in the dev stack (`worker.<pool>`; `worker`), each pool with its own
cooldowns, its own target (its workers_cap_seconds) and a ceiling of its own
partitions. A pool the dev stack runs no workers for is left alone. Without a fleet
file this is the one `workers` stage, as before.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.scaling import advise
from streams.config import Settings
from streams.fleet import Fleet, Pool, load_fleet
from streams.lifecycle import announce_ready, stop_on_signals
from streams.outgoing import now_ms
from streams.pressure_feed import PressureListener
from tidegate import devstack
from tidegate.processes import DevStackError
from tidegate.supervisor import Plan, pool_role

log = logging.getLogger("tidegate.autoscaler")

CHECK_S = 2.0


@dataclass
class Limits:
    min_workers: int = 1
    max_workers: int = 8
    out_cooldown_s: float = 10.0
    in_cooldown_s: float = 30.0
    scale_timeout_s: float = 60.0  # for the supervisor to have started or stopped the workers


@dataclass
class PoolTrack:
    """One pool's scaling memory: its role in the dev stack, its last change (or try)
    and since when its lag has been calm. Pools scale apart: one pool's change starts
    no other pool's cooldown."""

    pool: Pool
    role: str
    changed_at: float = 0.0
    changed_at_ms: int = 0  # wall clock of the last change (or try), against states' updated_ms
    calm_since: float | None = None

    @property
    def target_s(self) -> float:
        return self.pool.workers_cap_seconds


class Autoscaler:
    def __init__(
        self, stack: devstack.DevStack, settings: Settings, limits: Limits, fleet: Fleet | None = None
    ) -> None:
        """:raises FleetError: the fleet file is wrong (one line per mistake)."""
        self.stack = stack
        self.settings = settings
        self.limits = limits
        self.fleet = fleet if fleet is not None else load_fleet(settings)
        self.tracks = {name: PoolTrack(pool, pool_role(name)) for name, pool in self.fleet.pools.items()}
        self.listener = PressureListener(settings)
        self.stopping = threading.Event()

    def workers(self, track: PoolTrack) -> int:
        return len(self.stack.role_pids(track.role))

    def decide(self, track: PoolTrack, state: dict, now: float) -> int | None:
        """The worker count to take `track`'s pool to now, or None to stay."""
        current = self.workers(track)
        partitions = state.get("partitions") or self.limits.max_workers
        ceiling = min(self.limits.max_workers, partitions)
        target_s = track.target_s
        advice = advise(
            track.pool.stage,
            members=current,
            partitions=ceiling,
            arrival_rate=state.get("arrival_rate", 0.0),
            drain_rate=state["drain_rate"],
            lag=state["lag"],
            target_s=target_s,
            min_members=self.limits.min_workers,
        )
        lag_s = state.get("lag_seconds", 0.0)
        # refusing (warn/full) means demand past what the group drains, whatever the
        # arrival rate says: admitted arrivals are capped at the drain rate
        behind = lag_s > target_s or state["state"] in ("warn", "full")
        track.calm_since = None if lag_s >= target_s / 2 else (track.calm_since or now)
        # behind though the rates say the group is enough (they lag a rebalance): one more
        advice_n = current + 1 if behind and advice.recommended <= current < ceiling else advice.recommended
        said = self.said(track)
        if advice_n > current and now - track.changed_at >= self.limits.out_cooldown_s:
            log.warning("%sscale out %d -> %d: %s (lag %.1fs)", said, current, advice_n, advice.reason, lag_s)
            return min(ceiling, advice_n)
        calm_for = now - track.calm_since if track.calm_since is not None else 0.0
        cooled = now - track.changed_at >= self.limits.in_cooldown_s
        if advice_n < current and calm_for >= self.limits.in_cooldown_s and cooled:
            target = max(self.limits.min_workers, current - 1)  # one at a time: rates catch up
            log.warning("%sscale in %d -> %d: %s", said, current, target, advice.reason)
            return target
        return None

    def said(self, track: PoolTrack) -> str:
        """How the log names the pool: not at all without a fleet file (today's lines)."""
        return "" if self.fleet.single else f"pool={track.pool.name} "

    def fresh_state(self, track: PoolTrack) -> dict[str, Any] | None:
        """The pool's latest state, or None when there is none worth acting on: older
        than PRESSURE_STALE_S, or measured before its last change."""
        state = self.listener.board.state(track.pool.stage)
        if state is None:
            return None
        if now_ms() - state["updated_ms"] > self.settings.pressure_stale_s * 1000:
            return None
        return state if state["updated_ms"] > track.changed_at_ms else None

    def refresh_stack(self) -> None:
        """The stack as the supervisor's state file lists it now; the last known where
        the file is unreadable."""
        try:
            plan = Plan.load(Path(self.stack.log_dir) / "supervisor-plan.json")
            self.stack = devstack.DevStack.load(Path(plan.state_file))
        except (OSError, ValueError, TypeError, DevStackError) as exc:
            log.info("dev stack state not read, the last known stands: %s", exc)

    def check(self, now: float) -> None:
        """One check: for every pool the stack runs workers for, decide on a fresh
        state, and scale."""
        self.refresh_stack()
        for track in self.tracks.values():
            if self.fleet.single or self.workers(track) > 0:
                self.check_pool(track, now)

    def check_pool(self, track: PoolTrack, now: float) -> None:
        state = self.fresh_state(track)
        if state is None:
            return
        target = self.decide(track, state, now)
        if target is None or target == self.workers(track):
            return
        track.changed_at, track.changed_at_ms = now, now_ms()  # a failed try waits out the cooldown too
        try:
            self.stack = devstack.scale(self.stack, {track.role: target}, self.limits.scale_timeout_s)
        except (DevStackError, OSError, ValueError) as exc:
            log.warning(
                "%sscale to %d workers failed, trying again after the cooldown: %s", self.said(track), target, exc
            )

    def start_listener(self) -> None:
        """Starts reading the pressure topic; a topic just created has no leader for a
        moment and a broker may be restarting: the listener tries again with backoff
        (streams/pressure_feed.py), here for as long as it takes, never fatal."""
        self.listener.start(give_up_s=math.inf, stopping=self.stopping)

    def run(self) -> None:
        self.start_listener()
        if not self.fleet.single:  # which stage drives which role, once
            pools = ", ".join(f"{t.pool.stage} -> {t.role}" for t in self.tracks.values())
            log.warning("scaling each pool on its own state: %s", pools)  # said at the level scales are
        announce_ready()
        try:
            while not self.stopping.wait(CHECK_S):
                self.check(time.monotonic())
        finally:
            self.listener.close()


def main(limits: Limits | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stack = devstack.DevStack.load()
    fleet = {"fleet_file": stack.fleet_file} if stack.fleet_file else {}
    settings = Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, broker=stack.broker, **fleet)
    scaler = Autoscaler(stack, settings, limits or Limits())
    stop_on_signals(scaler.stopping)
    scaler.run()


if __name__ == "__main__":
    main()
