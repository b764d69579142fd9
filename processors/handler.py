"""The processors' work on one batch of raw request records, independent of faust.

decode -> validate -> deadline -> admission -> token counts (one tokenizer call)
-> per request one Redis script, all in one pipeline: dedupe, read the history the
strategy needs, append the new turns -> compress -> ContextEnvelope.
Every input record yields exactly one output: an envelope, a reply, or a dead letter
(duplicates of an already forwarded request yield nothing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

from conversation.history import (
    ENVELOPE,
    TURNS,
    HistoryWriter,
    StoredHistory,
    Turn,
    content_digest,
    loaded_history,
    seen_key,
)
from conversation.tokens import TokenCounter
from processors.admission import STAGE, Admission, AdmissionGate, NearFull, Release
from processors.compression import compress, fit_new_turns, reads_newest_only
from processors.embeddings import Embedder, from_bytes, to_bytes
from processors.fairness import FairShares
from processors.quotas import Quotas
from processors.validation import invalid_reason
from schemas import AVRO, SerializationError, content_type_header, get_codec
from streams import metrics
from streams.config import Settings
from streams.faults import fault_point
from streams.outgoing import Outgoing, build_reply, dead_letter, now_ms, reply_message
from streams.reply_topics import ReplyTopics
from streams.tenants import Tenants
from streams.validation import reply_to_reason

log = logging.getLogger(__name__)

REDIS_RETRY_S = 1.0

# produces records and returns once the broker acknowledged every one
Deliver = Callable[[list[Outgoing]], Awaitable[None]]


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
    record: Incoming
    request: dict[str, Any]
    encoding: str
    started_ms: int
    system_prompt: str
    system_tokens: int
    strategy: str
    new_turns: list[Turn] = field(default_factory=list)
    history: StoredHistory = field(default_factory=StoredHistory)
    cached_vectors: dict[bytes, bytes] = field(default_factory=dict)  # digest -> embedding
    new_vectors: dict[str, bytes] = field(default_factory=dict)  # to store
    similarity: list[float] | None = None


class RequestHandler:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        counter: TokenCounter,
        admission: Admission | None = None,
        reply_topics: ReplyTopics | None = None,
        near_full: NearFull | None = None,
        tenants: Tenants | None = None,
        release: Release | None = None,
    ) -> None:
        self.settings = settings
        self.reply_topics = reply_topics  # None: reply_to names are not checked against the broker
        tenants = tenants or Tenants()
        self.gate = AdmissionGate(
            admission,
            release,
            near_full,
            FairShares(tenants, settings.fair_share_window_s) if settings.fair_shares else None,
            Quotas(redis, tenants) if tenants.limited else None,
            self._redis_down,
        )
        self.redis = redis
        self.counter = counter
        self.history = HistoryWriter(settings.history_ttl_s, settings.history_max_turns)
        self.codec = get_codec()
        self._redis_down_until = 0.0
        self._system_tokens = counter.count(settings.system_prompt)
        self._embedder: Embedder | None = None  # loaded on the first `relevance` request

    async def handle(self, batch: Sequence[Incoming], deliver: Deliver) -> None:
        """Handles a batch: every output goes through `deliver`, which returns once the
        broker acknowledged it. A request's claim and turns are written to Redis only
        after its envelope was acknowledged (conversation/history.py). Requests of one
        conversation go in waves, one per wave, so each sees the turns of the one
        before it in the batch."""
        out: list[Outgoing] = []
        accepted: list[_Accepted] = []
        for record in batch:
            result = self._admit(record)
            if isinstance(result, Outgoing):
                out.append(result)
            elif result is not None:
                accepted.append(result)
        if accepted:
            self._count_new_turns(accepted)
            accepted = await self._unclaimed(accepted)
            accepted = await self.gate.admitted(accepted, out, self._refuse_item, self._quota_tokens)
        if not accepted:
            await deliver(out)
            return
        for wave in _waves(accepted):
            envelopes, forwarded, degraded = await self._build_envelopes(wave)
            fault_point("processor.before_forward")  # history read, nothing forwarded or claimed
            await deliver(out + envelopes)
            out = []
            fault_point("processor.after_forward")  # forwarded, not yet claimed
            if not degraded:
                await self._claim_and_append(forwarded)

    def _admit(self, record: Incoming) -> Outgoing | _Accepted | None:
        """The record's reply or dead letter, or the accepted request. Whatever goes
        wrong with one record (a crafted field the checks missed) is that record's
        dead letter, never its batch's."""
        try:
            return self._admit_checked(record)
        except Exception as exc:
            log.exception("topic=%s partition=%d offset=%d failed alone", record.topic, record.partition, record.offset)
            return self._dead_letter(record, f"processor error on this record: {exc!r}", "processor_error")

    def _dead_letter(self, record: Incoming, reason: str, label: str) -> Outgoing:
        metrics.DEAD_LETTERS.labels(STAGE, label).inc()
        return self._dead_letter_later(record, reason)

    def _dead_letter_later(self, record: Incoming, reason: str) -> Outgoing:
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

    def _admit_checked(self, record: Incoming) -> Outgoing | _Accepted | None:
        started = now_ms()
        try:
            request, encoding = self.codec.decode_message(record.value, record.headers, "InferenceRequest")
        except SerializationError as exc:
            log.warning(
                "topic=%s partition=%d offset=%d dead-letter: %s", record.topic, record.partition, record.offset, exc
            )
            return self._dead_letter(record, str(exc), "undecodable")
        tenant = self.settings.topics.tenant_of(record.topic)
        if tenant is not None:  # its principal may write only there: the topic says who sent it
            request["tenant"] = tenant
        if self.reply_topics is not None:
            unanswerable = self.reply_topics.reason(request["reply_to"], tenant)
        else:
            unanswerable = reply_to_reason(request["reply_to"], self.settings, tenant)
        if unanswerable is not None:
            return self._dead_letter(record, unanswerable, "unanswerable")
        if not request["created_ms"]:
            request["created_ms"] = started
        reason = invalid_reason(request, self.settings)
        if reason is not None:
            return self._refuse(record, request, encoding, started, "invalid", reason)
        if request["deadline_ms"] and started > request["deadline_ms"]:
            late = started - request["deadline_ms"]
            return self._refuse(
                record, request, encoding, started, "expired", f"deadline passed {late} ms before processing"
            )
        system = [m["content"] for m in request["messages"] if m["role"] == "system"]
        # counted for the whole batch at once (_count_new_turns)
        new_turns = [
            {"role": m["role"], "content": m["content"], "tokens": 0}
            for m in request["messages"]
            if m["role"] != "system"
        ]
        strategy = request["strategy"] or self.settings.default_strategy
        system_prompt = system[0] if system else self.settings.system_prompt
        system_tokens = (
            self._system_tokens if system_prompt == self.settings.system_prompt else self.counter.count(system_prompt)
        )
        return _Accepted(record, request, encoding, started, system_prompt, system_tokens, strategy, new_turns)

    def _refuse(
        self,
        record: Incoming,
        request: dict[str, Any],
        encoding: str,
        started_ms: int,
        status: str,
        error: str,
        retry_after_ms: int | None = None,
        stage: str = STAGE,
    ) -> Outgoing:
        """The reply that refuses `request`; its fallback is the record's dead letter."""
        metrics.REFUSALS.labels(stage, request["priority"], status).inc()
        if retry_after_ms is not None:
            metrics.RETRY_AFTER.labels(stage).observe(retry_after_ms / 1000)
        timings = {"queued_ms": max(0, started_ms - request["created_ms"])}
        reply = build_reply(request, status, error=error, retry_after_ms=retry_after_ms, timings=timings)
        out = reply_message(reply, request["reply_to"], encoding)
        out.fallback = self._dead_letter_later(record, f"{status} reply to {request['reply_to']!r} refused")
        return out

    def _refuse_item(
        self, item: _Accepted, status: str, error: str, retry_after_ms: int | None, stage: str
    ) -> Outgoing:
        return self._refuse(
            item.record, item.request, item.encoding, item.started_ms, status, error, retry_after_ms, stage
        )

    @staticmethod
    def _quota_tokens(item: _Accepted) -> int:
        """What a request may cost at most: its own turns and its max_new_tokens."""
        return sum(t["tokens"] for t in item.new_turns) + item.request["max_new_tokens"]

    async def _unclaimed(self, accepted: list[_Accepted]) -> list[_Accepted]:
        """The requests not claimed before (one round trip): a redelivered duplicate of
        a forwarded request is dropped before the gate, so it is neither charged to
        its tenant's quota nor refused `queue_full` (a refusal that could reach its
        caller before the real reply). The read script checks the claim again."""
        if not self.gate.refuses or time.monotonic() < self._redis_down_until:
            return accepted
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in accepted:
                    pipe.exists(seen_key(item.request["tenant"], item.request["request_id"]))
                claimed = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._redis_down(exc)
            return accepted
        return [item for item, seen in zip(accepted, claimed, strict=True) if not seen]

    def _count_new_turns(self, accepted: list[_Accepted]) -> None:
        """Token counts of every new turn in the batch, in one tokenizer call."""
        counts = iter(self.counter.count_many([t["content"] for item in accepted for t in item.new_turns]))
        for item in accepted:
            for turn in item.new_turns:
                turn["tokens"] = next(counts)

    def _turn_budget(self, item: _Accepted) -> int:
        return max(1, self.settings.token_budget - item.system_tokens)

    def _history_room(self, item: _Accepted) -> int | None:
        """Tokens of newest history the strategy can keep; None when it looks at all of it."""
        if not reads_newest_only(item.strategy):
            return None
        budget = self._turn_budget(item)
        return budget - sum(t["tokens"] for t in fit_new_turns(item.new_turns, budget, self.counter))

    async def _build_envelopes(self, accepted: list[_Accepted]) -> tuple[list[Outgoing], list[_Accepted], bool]:
        """Envelopes for the requests not processed before, those requests, and
        whether Redis was unreachable (then every request goes on without history)."""
        fresh, degraded = await self._load(accepted)
        # not fresh: claimed before, so forwarded and acknowledged once: no output
        items = [item for item, is_fresh in zip(accepted, fresh, strict=True) if is_fresh]
        relevant = [item for item in items if item.strategy == "relevance" and item.history]
        if relevant:
            await asyncio.to_thread(self._score_relevance, relevant)
        out = [self._envelope(item, degraded) for item in items]
        if relevant and not degraded:
            await self._store_embeddings(relevant)
        return out, items, degraded

    def _envelope(self, item: _Accepted, degraded: bool) -> Outgoing:
        request = item.request
        budget = self.settings.token_budget
        context = compress(
            item.strategy, item.history, item.new_turns, self._turn_budget(item), self.counter, item.similarity
        )
        forwarded = now_ms()
        envelope = {
            "version": 3,
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
            "turns": [],  # spliced in below
            "summary": context.summary,
            "token_budget": budget,
            "tokens_used": context.tokens_used + item.system_tokens,
            "strategy": context.strategy,
            "turns_dropped": context.turns_dropped + item.history.skipped,
            "degraded": degraded,
            "queued_ms": max(0, item.started_ms - request["created_ms"]),
            "context_ms": forwarded - item.started_ms,
            "forwarded_ms": forwarded,
            "stream": request["stream"],
        }
        # kept history goes in as stored (Avro bodies); only the request's own turns are encoded
        bodies = [item.history.bodies[i] for i in context.kept]
        bodies += [self.codec.encode_item(ENVELOPE, TURNS, t) for t in context.new_turns]
        value = self.codec.encode_with_items(ENVELOPE, envelope, TURNS, bodies)
        return Outgoing(
            self.settings.topics.contexts, request["session_id"].encode(), value, [content_type_header(AVRO)]
        )

    async def _load(self, accepted: list[_Accepted]) -> tuple[list[bool], bool]:
        """One pipeline: per request the read script (and the cached embeddings for
        `relevance`). Fills each item's history; a request id claimed before is not
        fresh. Redis down: every request fresh, degraded."""
        if time.monotonic() < self._redis_down_until:
            return [True] * len(accepted), True
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in accepted:
                    request = item.request
                    tenant, session = request["tenant"], request["session_id"]
                    room = self._history_room(item)
                    self.history.load(pipe, request["request_id"], tenant, session, room)
                    if item.strategy == "relevance":
                        self.history.load_embeddings(pipe, tenant, session)
                results = iter(await pipe.execute())
        except (RedisError, OSError) as exc:
            self._redis_down(exc)
            return [True] * len(accepted), True
        metrics.REDIS_DEGRADED.labels(STAGE).set(0)
        fresh = []
        for item in accepted:
            history = loaded_history(next(results))
            fresh.append(history is not None)
            if history is not None:
                item.history = history
            if item.strategy == "relevance":
                item.cached_vectors = next(results)
        return fresh, False

    async def _claim_and_append(self, items: list[_Accepted]) -> None:
        """One pipeline: per forwarded request, its claim and its own turns. Redis down
        here: the turns are missing from the history, and a redelivery of the request
        would be forwarded again (the worker and the client drop the duplicate)."""
        if not items:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in items:
                    request = item.request
                    self.history.claim_append(
                        pipe, request["request_id"], request["tenant"], request["session_id"], item.new_turns
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._redis_down(exc)

    def _score_relevance(self, items: list[_Accepted]) -> None:
        """Similarity of every history turn to the new question; embeds only what is
        not cached yet (each turn is embedded once, then stored in Redis)."""
        if self._embedder is None:
            self._embedder = Embedder()
        digests = [[content_digest(turn["content"]) for turn in item.history] for item in items]
        missing: dict[str, str] = {}
        for item, item_digests in zip(items, digests, strict=True):
            for turn, digest in zip(item.history, item_digests, strict=True):
                if digest.encode() not in item.cached_vectors:
                    missing[digest] = turn["content"]
        questions = [next((t["content"] for t in reversed(i.new_turns) if t["role"] == "user"), "") for i in items]
        vectors = self._embedder.embed(list(missing.values()) + questions)
        computed = {d: to_bytes(v) for d, v in zip(missing, vectors, strict=False)}
        for item, item_digests, text, question in zip(items, digests, questions, vectors[len(missing) :], strict=True):
            item.new_vectors[content_digest(text)] = to_bytes(question)  # the question becomes a history turn
            rows = []
            for digest in item_digests:
                if digest in computed:
                    item.new_vectors[digest] = computed[digest]
                    rows.append(from_bytes(computed[digest]))
                else:
                    rows.append(from_bytes(item.cached_vectors[digest.encode()]))
            item.similarity = (np.stack(rows) @ question).tolist() if rows else []

    async def _store_embeddings(self, items: list[_Accepted]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in items:
                    tenant, session = item.request["tenant"], item.request["session_id"]
                    # cached vectors of turns the history has trimmed away
                    kept = {content_digest(t["content"]).encode() for t in item.history} | {
                        d.encode() for d in item.new_vectors
                    }
                    stale = [d for d in item.cached_vectors if d not in kept]
                    self.history.store_embeddings(pipe, tenant, session, item.new_vectors, stale)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._redis_down(exc)

    def _redis_down(self, exc: Exception) -> None:
        log.warning("redis unreachable, going on degraded for %.0fs: %s", REDIS_RETRY_S, exc)
        self._redis_down_until = time.monotonic() + REDIS_RETRY_S
        metrics.REDIS_DEGRADED.labels(STAGE).set(1)


def _waves(items: list[_Accepted]) -> list[list[_Accepted]]:
    """Splits a batch so that each conversation has at most one request per wave, in
    order: a request then reads the history its predecessor in the batch appended."""
    waves: list[list[_Accepted]] = []
    seen: dict[tuple[str, str], int] = {}
    for item in items:
        key = (item.request["tenant"], item.request["session_id"])
        index = seen.get(key, -1) + 1
        seen[key] = index
        if index == len(waves):
            waves.append([])
        waves[index].append(item)
    return waves
