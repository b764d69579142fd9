"""The processors' work on one batch of raw request records, independent of faust.

decode -> validate -> deadline -> dedupe + history read (one Redis pipeline)
-> compress -> ContextEnvelope; then the new turns are appended to the history.
Every input record yields exactly one output: an envelope, a reply, or a dead letter
(duplicates of an already forwarded request yield nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from processors.compression import compress
from processors.history import HistoryWriter, Turn, decode_turns
from processors.tokens import TokenCounter
from processors.validation import invalid_reason
from schemas import AVRO, SerializationError, content_type_header, get_codec
from streams.config import Settings
from streams.outgoing import Outgoing, build_reply, dead_letter, now_ms, reply_message

log = logging.getLogger(__name__)

STAGE = "processors"
REDIS_RETRY_S = 1.0

# (stage, lag, cap, retry_after_ms) when the request must be refused, else None
Admission = Callable[[dict[str, Any]], tuple[str, int, int, int] | None]


@dataclass(slots=True)
class Incoming:
    """One consumed record, whatever client read it."""

    value: bytes | None
    key: bytes | None
    headers: Sequence[tuple[str, bytes]]
    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class _Accepted:
    request: dict[str, Any]
    encoding: str
    started_ms: int
    system_prompt: str
    new_turns: list[Turn] = field(default_factory=list)


class RequestHandler:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        counter: TokenCounter,
        admission: Admission | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.counter = counter
        self.admission = admission
        self.history = HistoryWriter(settings.history_ttl_s, settings.history_max_turns)
        self.codec = get_codec()
        self._redis_down_until = 0.0
        self._system_tokens = counter.count(settings.system_prompt)

    async def handle(self, batch: Sequence[Incoming]) -> list[Outgoing]:
        out: list[Outgoing] = []
        accepted: list[_Accepted] = []
        for record in batch:
            result = self._admit(record)
            if isinstance(result, Outgoing):
                out.append(result)
            elif result is not None:
                accepted.append(result)
        if accepted:
            out.extend(await self._build_envelopes(accepted))
        return out

    def _admit(self, record: Incoming) -> Outgoing | _Accepted | None:
        started = now_ms()
        try:
            request, encoding = self.codec.decode_message(record.value, record.headers, "InferenceRequest")
        except SerializationError as exc:
            log.warning(
                "topic=%s partition=%d offset=%d dead-letter: %s", record.topic, record.partition, record.offset, exc
            )
            return dead_letter(
                self.settings.topics.dead_letter,
                record.value,
                record.key,
                reason=str(exc),
                source_topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                stage=STAGE,
            )
        if not request["created_ms"]:
            request["created_ms"] = started
        timings = {"queued_ms": max(0, started - request["created_ms"])}

        def refuse(status: str, error: str, retry_after_ms: int | None = None) -> Outgoing:
            reply = build_reply(request, status, error=error, retry_after_ms=retry_after_ms, timings=timings)
            return reply_message(reply, request["reply_to"], encoding)

        reason = invalid_reason(request, self.settings)
        if reason is not None:
            return refuse("invalid", reason)
        if request["deadline_ms"] and started > request["deadline_ms"]:
            return refuse("expired", f"deadline passed {started - request['deadline_ms']} ms before processing")
        if self.admission is not None:
            full = self.admission(request)
            if full is not None:
                stage, lag, cap, retry_after_ms = full
                return refuse("queue_full", f"stage {stage} lag {lag} is past its cap {cap}", retry_after_ms)
        system = [m["content"] for m in request["messages"] if m["role"] == "system"]
        new = [m for m in request["messages"] if m["role"] != "system"]
        counts = self.counter.count_many([m["content"] for m in new])
        turns = [{"role": m["role"], "content": m["content"], "tokens": n} for m, n in zip(new, counts, strict=True)]
        return _Accepted(request, encoding, started, system[0] if system else self.settings.system_prompt, turns)

    async def _build_envelopes(self, accepted: list[_Accepted]) -> list[Outgoing]:
        histories, fresh, degraded = await self._claim_and_load(accepted)
        out: list[Outgoing] = []
        to_append: list[_Accepted] = []
        for item, history, is_fresh in zip(accepted, histories, fresh, strict=True):
            if not is_fresh:
                continue  # already forwarded once (at-least-once redelivery)
            out.append(self._envelope(item, history, degraded))
            to_append.append(item)
        if to_append and not degraded:
            await self._append(to_append)
        return out

    def _envelope(self, item: _Accepted, history: list[Turn], degraded: bool) -> Outgoing:
        request = item.request
        budget = self.settings.token_budget
        system_tokens = (
            self._system_tokens
            if item.system_prompt == self.settings.system_prompt
            else self.counter.count(item.system_prompt)
        )
        strategy = request["strategy"] or self.settings.default_strategy
        context = compress(strategy, history, item.new_turns, max(1, budget - system_tokens), self.counter)
        forwarded = now_ms()
        envelope = {
            "version": 1,
            "request_id": request["request_id"],
            "session_id": request["session_id"],
            "tenant": request["tenant"],
            "reply_to": request["reply_to"],
            "reply_encoding": item.encoding,
            "priority": request["priority"],
            "max_new_tokens": request["max_new_tokens"],
            "temperature": request["temperature"],
            "created_ms": request["created_ms"],
            "deadline_ms": request["deadline_ms"],
            "system_prompt": item.system_prompt,
            "turns": context.turns,
            "summary": context.summary,
            "snippets": [],
            "token_budget": budget,
            "tokens_used": context.tokens_used + system_tokens,
            "strategy": context.strategy,
            "turns_dropped": context.turns_dropped,
            "degraded": degraded,
            "queued_ms": max(0, item.started_ms - request["created_ms"]),
            "context_ms": forwarded - item.started_ms,
            "forwarded_ms": forwarded,
        }
        value = self.codec.encode("ContextEnvelope", envelope)
        return Outgoing(
            self.settings.topics.contexts, request["session_id"].encode(), value, [content_type_header(AVRO)]
        )

    async def _claim_and_load(self, accepted: list[_Accepted]) -> tuple[list[list[Turn]], list[bool], bool]:
        """One pipeline: SET NX per request id, LRANGE per session. Redis down: degraded."""
        if time.monotonic() < self._redis_down_until:
            return [[] for _ in accepted], [True] * len(accepted), True
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in accepted:
                    self.history.claim(pipe, item.request["request_id"])
                    self.history.load(pipe, item.request["tenant"], item.request["session_id"])
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._redis_down(exc)
            return [[] for _ in accepted], [True] * len(accepted), True
        claims, raws = results[0::2], results[1::2]
        return [decode_turns(raw) for raw in raws], [bool(c) for c in claims], False

    async def _append(self, items: list[_Accepted]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in items:
                    self.history.append(pipe, item.request["tenant"], item.request["session_id"], item.new_turns)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._redis_down(exc)

    def _redis_down(self, exc: Exception) -> None:
        log.warning("redis unreachable, going on degraded for %.0fs: %s", REDIS_RETRY_S, exc)
        self._redis_down_until = time.monotonic() + REDIS_RETRY_S
