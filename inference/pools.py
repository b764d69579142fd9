"""The pool a worker serves (TIDEGATE_POOL), and the worker's settings for it.

A pool of the fleet (streams/fleet.py) has its own contexts topic, worker group,
engine and batch size: a worker of the pool reads the pool's topic in the pool's
group and runs the pool's engine in place of MODEL. Without a fleet file the one
pool, `default`, is today's topic, group and MODEL: nothing changes.
"""

from __future__ import annotations

from streams.config import Settings
from streams.fleet import FleetError, Pool, load_fleet


def worker_pool(settings: Settings) -> tuple[Settings, Pool]:
    """The pool POOL names, and `settings` with its group, engine and max_batch.

    :raises FleetError: the fleet file is wrong, or has no such pool (one line each)."""
    fleet = load_fleet(settings)
    pool = fleet.pools.get(settings.pool)
    if pool is None:
        raise FleetError(
            f"TIDEGATE_POOL={settings.pool[:64]!r} is not a pool of the fleet (pools: {', '.join(fleet.pools)})"
        )
    update: dict[str, object] = {"model": pool.engine, "worker_group": pool.group}
    if pool.max_batch is not None:
        update["max_batch"] = pool.max_batch
    return settings.model_copy(update=update), pool
