"""The replies the processors send instead of an envelope, and the dead letters.

A request refused before its history was read (`expired`, `queue_full`, a failed
step's `error`) may be a redelivered duplicate: forwarded and claimed
before a processor crash, its worker already generating. Refused as it came, its
caller got the refusal and the worker's real reply, whichever first. So such
refusals wait for `unless_claimed`: one Redis call per batch, only for the
requests refused, sends the refusals of requests never claimed and drops the
others (a duplicate yields no output). An `invalid` request is not looked up: the
same checks refused it when it first came, so it was never forwarded. Redis
unreachable: every refusal is sent, as before (a duplicate then gets its refusal
beside its reply).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from conversation.history import HistoryWriter, held_claims
from processors.admission import STAGE
from processors.envelopes import Incoming
from streams import metrics
from streams.config import Settings
from streams.outgoing import Outgoing, build_reply, dead_letter, reply_message
from streams.validation import MAX_ID_CHARS

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Refusal:
    """A reply that refuses `request`, built only once it is known to be sent."""

    record: Incoming
    request: dict[str, Any]
    encoding: str
    started_ms: int
    status: str
    error: str
    retry_after_ms: int | None = None
    stage: str = STAGE


class Refusals:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        history: HistoryWriter,
        redis_down: Callable[[], bool],
        on_redis_down: Callable[[Exception], None],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.history = history
        self.redis_down = redis_down  # True while the handler goes on without Redis
        self.on_redis_down = on_redis_down

    def reply(self, refusal: Refusal, counted: bool = True) -> Outgoing:
        """The reply that refuses the request; its fallback is the record's dead letter.
        `counted`: False for a fallback (an envelope's), counted nowhere as it may not be sent."""
        request, status = refusal.request, refusal.status
        if counted:
            metrics.REFUSALS.labels(refusal.stage, request["priority"], status).inc()
        if counted and refusal.retry_after_ms is not None:
            metrics.RETRY_AFTER.labels(refusal.stage).observe(refusal.retry_after_ms / 1000)
        timings = {"queued_ms": max(0, refusal.started_ms - request["created_ms"])}
        reply = build_reply(
            request, status, error=refusal.error, retry_after_ms=refusal.retry_after_ms, timings=timings
        )
        out = reply_message(reply, request["reply_to"], refusal.encoding)
        out.fallback = self.dead_letter_later(refusal.record, f"{status} reply to {request['reply_to']!r} refused")
        return out

    async def unless_claimed(self, refusals: list[Refusal]) -> list[Outgoing]:
        """The replies of `refusals` whose requests were never claimed (one Redis call
        for all of them); all of them while Redis is unreachable."""
        held = [False] * len(refusals)
        asked = [i for i, refusal in enumerate(refusals) if _may_be_claimed(refusal)]
        if asked and not self.redis_down():
            pairs = [(refusals[i].request["tenant"], refusals[i].request["request_id"]) for i in asked]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    self.history.lookup_claims(pipe, pairs)
                    (reply,) = await pipe.execute()
                for i, claimed in zip(asked, held_claims(reply), strict=True):
                    held[i] = claimed
            except (RedisError, OSError) as exc:
                self.on_redis_down(exc)
        out = []
        for refusal, claimed in zip(refusals, held, strict=True):
            if claimed:  # forwarded before: its worker answers it
                log.info(
                    "request %r claimed before: not refused %s", refusal.request["request_id"][:80], refusal.status
                )
                continue
            try:
                out.append(self.reply(refusal))
            except Exception as exc:  # a field the reply needs is broken: its record's dead letter alone
                log.exception("the %s reply of request %r", refusal.status, refusal.request["request_id"][:80])
                why = f"its {refusal.status} reply could not be built: {exc!r}"[:300]
                out.append(self.dead_letter(refusal.record, why, "processor_error"))
        return out

    def dead_letter(self, record: Incoming, reason: str, label: str) -> Outgoing:
        metrics.DEAD_LETTERS.labels(STAGE, label).inc()
        return self.dead_letter_later(record, reason)

    def dead_letter_later(self, record: Incoming, reason: str) -> Outgoing:
        """The record's dead letter, for a fallback: counted only if it is sent."""
        return dead_letter(
            self.settings.topics.dead_letter,
            record.value,
            record.key,
            reason=reason,
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=STAGE,
        )


def _may_be_claimed(refusal: Refusal) -> bool:
    """Whether the refused request could have been forwarded before: an `invalid` one
    was not (the same checks refused it then), nor one whose ids are over the limit
    (a crafted record in a failed batch: its ids are not sent to Redis)."""
    request = refusal.request
    if refusal.status == "invalid":
        return False
    return len(request["tenant"]) <= MAX_ID_CHARS and len(request["request_id"]) <= MAX_ID_CHARS
