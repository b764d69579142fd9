"""Pools paused by their provider: a 429's wait, shared through the pressure topic.

A worker of a remote pool (inference/remote_worker.py) told by its provider to wait
(a 429's `retry-after`, or a limit spent: inference/rate_limits.py) publishes a
PoolPause, key `pause.<pool>`, to the pressure topic. Every reader of that topic keeps
the latest pause per pool here (PressureBoard.pauses, fed by streams/pressure_feed.py):

- the pool's other workers stop consuming until it ends, together, instead of each
  discovering the limit with a 429 of its own;
- the routers (streams/routing.py) treat the pool as full until then, with a retry
  time that includes the provider's wait.

A pool's pause is the LATEST end any record gave it: a second, shorter wait never
cuts a longer one short (LiteLLM kept the first, shorter cooldown). Ends are
wall-clock milliseconds; the hosts' clocks are assumed within a few hundred ms.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from schemas import AVRO, content_type_header, get_codec
from streams.outgoing import Outgoing, now_ms

PAUSE_KEY_PREFIX = "pause."


def pause_key(pool: str) -> bytes:
    """The pause's key on the compacted pressure topic: one live record per pool."""
    return f"{PAUSE_KEY_PREFIX}{pool}".encode()


@dataclass(frozen=True, slots=True)
class Pause:
    pool: str
    until_ms: int
    reason: str = ""
    member: str = ""
    updated_ms: int = 0


class PoolPauses:
    """The latest end of each pool's pause, from the PoolPause records read so far."""

    def __init__(self) -> None:
        self._pauses: dict[str, Pause] = {}
        self._lock = threading.Lock()

    def note(self, record: dict[str, Any]) -> Pause:
        """Takes a PoolPause record; returns the pool's pause now (the later end wins)."""
        pause = Pause(
            record["pool"],
            int(record["until_ms"]),
            record.get("reason") or "",
            record.get("member") or "",
            int(record.get("updated_ms") or 0),
        )
        with self._lock:
            current = self._pauses.get(pause.pool)
            if current is None or pause.until_ms > current.until_ms:
                self._pauses[pause.pool] = current = pause
            return current

    def current(self, pool: str, at_ms: int | None = None) -> Pause | None:
        """The pool's pause while it lasts, else None."""
        with self._lock:
            pause = self._pauses.get(pool)
        at_ms = now_ms() if at_ms is None else at_ms
        return pause if pause is not None and pause.until_ms > at_ms else None

    def ended_ms(self, pool: str) -> int:
        """When the pool's latest pause ends or ended (0: never paused)."""
        with self._lock:
            pause = self._pauses.get(pool)
        return pause.until_ms if pause is not None else 0

    def remaining_ms(self, pool: str, at_ms: int | None = None) -> int:
        """How long the pool stays paused (0: it is not)."""
        at_ms = now_ms() if at_ms is None else at_ms
        pause = self.current(pool, at_ms)
        return pause.until_ms - at_ms if pause is not None else 0


def pause_message(topic: str, pool: str, until_ms: int, reason: str, member: str) -> Outgoing:
    """The PoolPause record for the pressure topic."""
    record = {"pool": pool, "until_ms": until_ms, "reason": reason, "member": member, "updated_ms": now_ms()}
    return Outgoing(topic, pause_key(pool), get_codec().encode("PoolPause", record), [content_type_header(AVRO)])
