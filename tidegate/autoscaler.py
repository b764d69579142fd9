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
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ops.scaling import advise
from streams.config import Settings
from streams.lag import WORKERS
from streams.lifecycle import announce_ready, stop_on_signals
from streams.pressure_feed import PressureListener
from tidegate import devstack

log = logging.getLogger("tidegate.autoscaler")

CHECK_S = 2.0


@dataclass
class Limits:
    min_workers: int = 1
    max_workers: int = 8
    out_cooldown_s: float = 10.0
    in_cooldown_s: float = 30.0


class Autoscaler:
    def __init__(self, stack: devstack.DevStack, settings: Settings, limits: Limits) -> None:
        self.stack = stack
        self.settings = settings
        self.limits = limits
        self.target_s = settings.workers_cap_seconds
        self.listener = PressureListener(settings)
        self.stopping = threading.Event()
        self.changed_at = 0.0
        self.calm_since: float | None = None

    def workers(self) -> int:
        return len(self.stack.role_pids("worker"))

    def decide(self, state: dict, now: float) -> int | None:
        """The worker count to go to now, or None to stay."""
        current = self.workers()
        partitions = state.get("partitions") or self.limits.max_workers
        ceiling = min(self.limits.max_workers, partitions)
        advice = advise(
            WORKERS,
            members=current,
            partitions=ceiling,
            arrival_rate=state.get("arrival_rate", 0.0),
            drain_rate=state["drain_rate"],
            lag=state["lag"],
            target_s=self.target_s,
            min_members=self.limits.min_workers,
        )
        lag_s = state.get("lag_seconds", 0.0)
        # refusing (warn/full) means demand past what the group drains, whatever the
        # arrival rate says: admitted arrivals are capped at the drain rate
        behind = lag_s > self.target_s or state["state"] in ("warn", "full")
        self.calm_since = None if lag_s >= self.target_s / 2 else (self.calm_since or now)
        # behind though the rates say the group is enough (they lag a rebalance): one more
        advice_n = current + 1 if behind and advice.recommended <= current < ceiling else advice.recommended
        if advice_n > current and now - self.changed_at >= self.limits.out_cooldown_s:
            log.warning("scale out %d -> %d: %s (lag %.1fs)", current, advice_n, advice.reason, lag_s)
            return min(ceiling, advice_n)
        calm_for = now - self.calm_since if self.calm_since is not None else 0.0
        cooled = now - self.changed_at >= self.limits.in_cooldown_s
        if advice_n < current and calm_for >= self.limits.in_cooldown_s and cooled:
            target = max(self.limits.min_workers, current - 1)  # one at a time: rates catch up
            log.warning("scale in %d -> %d: %s", current, target, advice.reason)
            return target
        return None

    def run(self) -> None:
        self.listener.start()
        announce_ready()
        try:
            while not self.stopping.wait(CHECK_S):
                state = self.listener.board.state(WORKERS)
                if state is None:
                    continue
                target = self.decide(state, time.monotonic())
                if target is not None and target != self.workers():
                    self.stack = devstack.scale(self.stack, {"worker": target})
                    self.changed_at = time.monotonic()
        finally:
            self.listener.close()


def main(limits: Limits | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stack = devstack.DevStack.load()
    settings = Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, broker=stack.broker)
    scaler = Autoscaler(stack, settings, limits or Limits())
    stop_on_signals(scaler.stopping)
    scaler.run()


if __name__ == "__main__":
    main()
