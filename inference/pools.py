"""The pool a worker serves (TIDEGATE_POOL), and the worker's settings for it.

A pool of the fleet (streams/fleet.py) has its own contexts topic, worker group,
engine and batch size: a worker of the pool reads the pool's topic in the pool's
group and runs the pool's engine in place of MODEL. Without a fleet file the one
pool, `default`, is today's topic, group and MODEL: nothing changes.
"""

from __future__ import annotations

import os

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


def provider_key(pool: Pool) -> str | None:
    """A remote pool's API key, from the variable its `api_key_env` names (None: the
    pool needs none, or is not remote). The key is never logged nor repeated.

    :raises FleetError: the variable is not set in the worker's environment."""
    if pool.remote is None or pool.remote.api_key_env is None:
        return None
    key = os.environ.get(pool.remote.api_key_env, "")
    if not key:
        raise FleetError(
            f"pools.{pool.name}.api_key_env: {pool.remote.api_key_env} is not set in the worker's environment"
        )
    return key
