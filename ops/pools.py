"""The pools' side of the lag monitor: each pool's cap, what its PressureState says of
the pool (its models, weight), and its circuit breaker.

Each pool of the fleet is a stage of its own (`workers` for the `default` pool,
`workers.<pool>` for the others: streams/fleet.py) with its own cap: a message count
(`workers_cap_messages`) or seconds of work (`workers_cap_seconds`), floored at
FLOOR_BATCHES of the pool's own batches (its `max_batch`, else MAX_BATCH). Its state
carries `pool`, `models` (each served model's id, aliases, token budget and
fallbacks: how a client without the fleet file learns the fleet), `weight` and the
circuit (ops/breaker.py). Without a fleet file the one pool is `default`, today's
`workers` stage with today's cap, and its circuit stays closed: a deployment that
has nowhere else to send a request gains no refusals from a breaker.

A remote pool its provider paused (streams/pauses.py, read from the pressure topic)
commits nothing while it waits, which Burrow's rules call STALL or STOP: during a
pause, and for a health window after it, such a pool is not `stalled` (it is full:
the routers refuse it with the provider's wait). Its errors still count.
"""

from __future__ import annotations

import logging
from typing import Any

from ops.breaker import CIRCUIT_CODES, CLOSED, HALF_OPEN, OPEN, Breaker, BreakerConfig, Circuit, Signals, stalled
from ops.outcomes_tail import OutcomesTail
from streams import metrics
from streams.config import Settings
from streams.fleet import Fleet, Pool
from streams.lag import StageLag
from streams.outgoing import now_ms
from streams.pauses import PoolPauses
from streams.pressure import FLOOR_BATCHES, StageCap
from streams.pressure_feed import PressureListener

log = logging.getLogger(__name__)


def pool_caps(settings: Settings, fleet: Fleet) -> dict[str, StageCap]:
    """Each pool's cap, by its stage (the `default` pool's is today's workers' cap)."""
    return {
        pool.stage: StageCap(
            pool.workers_cap_messages,
            pool.workers_cap_seconds,
            (pool.max_batch or settings.max_batch) * FLOOR_BATCHES,
        )
        for pool in fleet.pools.values()
    }


def pool_fields(fleet: Fleet, pool: Pool) -> dict[str, Any]:
    """What the pool's PressureState says of the pool itself."""
    models = [fleet.models[model_id] for model_id in pool.models if model_id in fleet.models]
    return {
        "pool": pool.name,
        "models": [
            {"id": m.id, "aliases": list(m.aliases), "token_budget": m.token_budget, "fallbacks": list(m.fallbacks)}
            for m in models
        ],
        "weight": pool.weight,
    }


class PoolStates:
    """The pools' breakers, fed by the workers' outcomes, and their fields in the states."""

    def __init__(self, settings: Settings, fleet: Fleet, pauses: PoolPauses | None = None) -> None:
        self.fleet = fleet
        self.by_stage = {pool.stage: pool for pool in fleet.pools.values()}
        # circuits open only where a fleet file gives routers somewhere else to go
        self.enabled = bool(settings.fleet_file)
        config = BreakerConfig.from_settings(settings)
        self.breakers = {name: Breaker(config, on_open=self._opened(name)) for name in fleet.pools}
        self.tail = OutcomesTail(settings) if self.enabled else None
        # remote pools' pauses, where the fleet has a remote pool: a paused pool is not stalled
        self.health_window_ms = int(settings.health_window_s * 1000)
        self.listener: PressureListener | None = None
        remote = any(pool.remote is not None for pool in fleet.pools.values())
        if pauses is None and self.enabled and remote:
            self.listener = PressureListener(settings)
            self.listener.start()
            pauses = self.listener.board.pauses
        self.pauses = pauses
        metrics.allow_label_values("pool", fleet.pools)
        metrics.allow_label_values("stage", self.by_stage)

    def _opened(self, pool: str) -> Any:
        def opened(reason: str) -> None:
            metrics.CIRCUIT_OPENS.labels(pool, reason).inc()
            log.warning("pool=%s circuit open (%s)", pool, reason)

        return opened

    def resume(self, stage: str, state: dict[str, Any]) -> None:
        """Takes a circuit up where an earlier monitor's last state left it: a restart
        must not close an open circuit (routing to a broken pool again) or open it anew."""
        pool = self.by_stage.get(stage)
        if pool is None or not self.enabled:
            return
        circuit = state.get("circuit", CLOSED)
        if circuit in (OPEN, HALF_OPEN):
            self.breakers[pool.name].resume(circuit, state.get("circuit_until_ms", 0) / 1000, state["circuit_reason"])
            log.info("pool=%s circuit resumed %s (%s)", pool.name, circuit, state["circuit_reason"])

    def poll(self) -> None:
        """Feeds the outcomes that arrived to their pools' breakers."""
        if self.tail is None:
            return
        for record in self.tail.poll():
            breaker = self.breakers.get(record["pool"])
            if breaker is not None:  # a worker of a pool this fleet does not have: not ours to judge
                breaker.record(record["ok"], record["errors"], record["expired"])

    def judge(self, stage: str, lag: StageLag, statuses: dict[str, str], state: dict[str, Any]) -> None:
        """Adds the pool's fields and circuit to its stage's `state` (after the monitor's
        own: members, health); a stage that is not a pool's is left as it is."""
        pool = self.by_stage.get(stage)
        if pool is None:
            return
        if self.enabled:
            lags = {label: p.lag for label, p in lag.partitions.items()}
            signals = Signals(lag.lag, state["members"], stalled(statuses, lags) and not self._paused_lately(pool))
            circuit = self.breakers[pool.name].update(signals)
        else:
            circuit = Circuit(CLOSED)
        state.update(pool_fields(self.fleet, pool), **circuit.fields())
        metrics.CIRCUIT_STATE.labels(pool.name).set(CIRCUIT_CODES[circuit.state])

    def _paused_lately(self, pool: Pool) -> bool:
        """Paused by its provider now, or within a health window (the window Burrow
        judges commits over still holds the pause)."""
        ended = self.pauses.ended_ms(pool.name) if self.pauses is not None else 0
        return bool(ended) and now_ms() - ended < self.health_window_ms

    def close(self) -> None:
        if self.tail is not None:
            self.tail.close()
        if self.listener is not None:
            self.listener.close()
