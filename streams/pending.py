"""The requests a client sent, until each one's reply is handed over.

A request is pending from the moment `submit` admits it until its reply is handed
to `generate`, `reply(request_id)` or the `replies()` iterator (or its stream
ends). Callers that submit and never read would keep their requests for ever, so
unclaimed requests past their time (deadline plus grace with no reply, or a reply
nobody took within `UNCLAIMED_REPLY_S`) are swept away, at most once per sweep
interval and only from `SWEEP_AT` pending on: a sweep scans every pending request,
and one per reply under a flood (thousands pending, hundreds of replies a second)
held the event loop long enough to hand acknowledgements back past their deadline.
A request still being sent is never swept: `submit` holds it (an acknowledgement
that came after the deadline left `generate` with no request to claim, a KeyError).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from streams.outgoing import now_ms
from streams.reply import Chunk, Reply

# a reply nobody took with reply() or replies() is dropped this long after it arrived
UNCLAIMED_REPLY_S = 300.0
SWEEP_AT = 1024  # pending requests from which abandoned ones are swept
SWEEP_INTERVAL_S = 1.0  # at most one sweep this often


@dataclass(slots=True)
class PendingRequest:
    """A request this client sent, until its reply is handed over."""

    future: asyncio.Future[Reply]
    give_up_at: float  # monotonic: deadline + grace, or arrival + UNCLAIMED_REPLY_S
    claimed: bool = False  # someone awaits it through reply() / generate()
    # not acknowledged by the broker yet: `submit` still holds it, so the sweep of
    # abandoned requests must not drop it (an acknowledgement that came after the
    # deadline left `generate` with no request to claim: a KeyError, not a reply)
    sending: bool = True
    chunks: asyncio.Queue[Chunk] | None = None  # a streamed request's chunks, as they arrive


class PendingRequests(dict[str, PendingRequest]):
    """The pending requests by request_id, and their sweep."""

    def __init__(self) -> None:
        super().__init__()
        self._swept_at = 0.0  # monotonic
        self.sweeps = 0  # sweeps run: a test waits for one between two steps

    def queue_chunk(self, chunk: Chunk) -> None:
        """Queues a chunk for its stream (none for other requests, or after the reply)."""
        pending = self.get(chunk.request_id)
        if pending is not None and pending.chunks is not None and not pending.future.done():
            pending.chunks.put_nowait(chunk)

    def resolve(self, reply: Reply) -> PendingRequest | None:
        """Resolves the request's future with its reply, the first copy only (a second
        one, a redelivery's, is dropped: None); an unclaimed reply is kept
        UNCLAIMED_REPLY_S from now."""
        pending = self.get(reply.request_id)
        if pending is None or pending.future.done():
            return None
        pending.future.set_result(reply)
        pending.give_up_at = time.monotonic() + UNCLAIMED_REPLY_S
        return pending

    def forget_abandoned(self, sweep_interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Drops unclaimed requests whose reply never came by their deadline plus grace,
        or came and was not taken within UNCLAIMED_REPLY_S: memory stays bounded for
        callers that submit and never read."""
        now = time.monotonic()
        if len(self) < SWEEP_AT or now - self._swept_at < sweep_interval_s:
            return
        self._swept_at = now
        self.sweeps += 1
        abandoned = [k for k, p in self.items() if not (p.claimed or p.sending) and p.give_up_at < now]
        for request_id in abandoned:
            self.pop(request_id).future.cancel()


def give_up_at(request: dict[str, Any], reply_grace_s: float) -> float:
    """When nobody waits for the request's reply any more (monotonic): its deadline plus
    the grace; never for a request without a deadline."""
    if not request["deadline_ms"]:
        return float("inf")
    return time.monotonic() + (request["deadline_ms"] - now_ms()) / 1000 + reply_grace_s
