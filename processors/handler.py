"""The processors' work on one batch of raw request records, independent of faust.

decode -> reply_to -> validate -> deadline -> token counts (one tokenizer call)
-> backpressure and fair share -> per request one Redis script, all in one
pipeline: dedupe, read the history the strategy needs -> quotas (only what is
forwarded is charged: processors/admission.py) -> compress -> ContextEnvelope ->
once acknowledged, claim and append the new turns.
Every input record yields exactly one output: an envelope, a reply, or a dead letter
(duplicates of an already forwarded request yield nothing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from conversation.history import (
    HistoryWriter,
    content_digest,
    loaded_history,
)
from conversation.tokens import TokenCounter
from processors.admission import STAGE, Admission, AdmissionGate, NearFull, Release
from processors.envelopes import Accepted, EnvelopeBuilder, Incoming
from processors.fairness import FairShares
from processors.quotas import Quotas
from processors.relevance import RelevanceScorer
from processors.validation import invalid_reason
from schemas import SerializationError, get_codec
from streams import metrics
from streams.config import Settings
from streams.faults import fault_armed, fault_point
from streams.outgoing import Outgoing, build_reply, dead_letter, now_ms, reply_message
from streams.reply_topics import ReplyTopics
from streams.tenants import Tenants
from streams.validation import reply_to_reason

log = logging.getLogger(__name__)

REDIS_RETRY_S = 1.0
WHY_MAX_CHARS = 300  # of an exception's text in an `error` reply

# produces records and returns once the broker acknowledged every one
Deliver = Callable[[list[Outgoing]], Awaitable[None]]


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
        self.relevance = RelevanceScorer()
        self.envelopes = EnvelopeBuilder(settings, counter, self.codec)

    async def handle(self, batch: Sequence[Incoming], deliver: Deliver) -> None:
        """Handles a batch: every output goes through `deliver`, which returns once the
        broker acknowledged it. A request's claim and turns are written to Redis only
        after its envelope was acknowledged (conversation/history.py). Requests of one
        conversation go in waves, one per wave, so each sees the turns of the one
        before it in the batch."""
        out: list[Outgoing] = []
        accepted: list[Accepted] = []
        decoded = [self._guarded(record, self._decode, record) for record in batch]
        if self.reply_topics is not None:  # the batch's unseen reply topics in one listing, off the loop
            await self.reply_topics.prepare(d[1]["reply_to"] for d in decoded if isinstance(d, tuple))
        for result in decoded:
            if isinstance(result, tuple):
                result = self._guarded(result[0], self._admit_checked, *result)
            if isinstance(result, Outgoing):
                out.append(result)
            elif result is not None:
                accepted.append(result)
        if accepted:
            accepted = self._count_new_turns(accepted, out)
            accepted = self.gate.downstream(accepted, out, self._refuse_item)
        if fault_armed("processor.batch_fails"):  # a step for the whole batch failing (its test)
            raise RuntimeError("injected fault processor.batch_fails")
        if not accepted:
            await deliver(out)
            return
        for wave in _waves(accepted):
            try:
                envelopes, forwarded, degraded = await self._build_envelopes(wave, out)
            except Exception as exc:  # a step for the whole wave failed: each of its requests answered
                log.exception("building %d envelopes failed; answering each `error`", len(wave))
                out += [self._failed(item, f"processor error: {_why(exc)}") for item in wave]
                envelopes, forwarded, degraded = [], [], True
            fault_point("processor.before_forward")  # history read, nothing forwarded or claimed
            await deliver(out + envelopes)
            out = []
            fault_point("processor.after_forward")  # forwarded, not yet claimed
            if not degraded:
                await self._claim_and_append(forwarded)

    def failed_batch(self, batch: Sequence[Incoming], exc: Exception) -> list[Outgoing]:
        """Outputs for a batch whose handling failed in a step not expected to: each
        record is answered `error` where a reply can be built, else dead-lettered."""
        why = f"processor error: {_why(exc)}"
        out = []
        for record in batch:
            try:
                request, encoding = self.codec.decode_message(record.value, record.headers, "InferenceRequest")
                tenant = self.settings.topics.tenant_of(record.topic)
                request["tenant"] = tenant or request["tenant"]
                if reply_to_reason(request["reply_to"], self.settings, tenant) is None:
                    out.append(self._refuse(record, request, encoding, now_ms(), "error", why))
                    continue
            except Exception:  # undecodable, or a field the reply needs is broken: no reply
                log.debug("no reply for a record of a failed batch", exc_info=True)
            out.append(self._dead_letter(record, why, "processor_error"))
        return out

    def _failed(self, item: Accepted, reason: str) -> Outgoing:
        """The `error` reply of an admitted request that failed alone."""
        log.warning("request %r failed alone: %s", item.request["request_id"][:80], reason)
        return self._refuse_item(item, "error", reason, None, STAGE)

    def _guarded(self, record: Incoming, step: Callable[..., Any], *args: Any) -> Any:
        """`step(*args)` for one record. Whatever goes wrong with one record (a crafted
        field the checks missed) is that record's dead letter, never its batch's."""
        try:
            return step(*args)
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

    def _decode(self, record: Incoming) -> Outgoing | tuple[Incoming, dict[str, Any], str, int]:
        """(record, request, encoding, started_ms), or the dead letter of a record that
        is no request."""
        started = now_ms()
        try:
            request, encoding = self.codec.decode_message(record.value, record.headers, "InferenceRequest")
        except SerializationError as exc:
            log.warning(
                "topic=%s partition=%d offset=%d dead-letter: %s", record.topic, record.partition, record.offset, exc
            )
            return self._dead_letter(record, str(exc), "undecodable")
        return record, request, encoding, started

    def _admit_checked(
        self, record: Incoming, request: dict[str, Any], encoding: str, started: int
    ) -> Outgoing | Accepted | None:
        """The record's reply or dead letter, or the accepted request."""
        tenant = self.settings.topics.tenant_of(record.topic)
        if tenant is not None:  # its principal may write only there: the topic says who sent it
            request["tenant"] = tenant
        if self.reply_topics is not None:
            unanswerable = self.reply_topics.reason(request["reply_to"], tenant, ask=False)
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
        return Accepted(record, request, encoding, started, system_prompt, system_tokens, strategy, new_turns)

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

    def _refuse_item(self, item: Accepted, status: str, error: str, retry_after_ms: int | None, stage: str) -> Outgoing:
        return self._refuse(
            item.record, item.request, item.encoding, item.started_ms, status, error, retry_after_ms, stage
        )

    @staticmethod
    def _quota_tokens(item: Accepted) -> int:
        """What a request may cost at most: its own turns and its max_new_tokens."""
        return sum(t["tokens"] for t in item.new_turns) + item.request["max_new_tokens"]

    def _count_new_turns(self, accepted: list[Accepted], out: list[Outgoing]) -> list[Accepted]:
        """Token counts of every new turn in the batch, in one tokenizer call; where
        that call fails, each request is counted alone and one that fails is answered."""
        try:
            counts = self.counter.count_many([t["content"] for item in accepted for t in item.new_turns])
        except Exception:
            log.exception("counting the tokens of %d requests failed; counting each alone", len(accepted))
            counted = []
            for item in accepted:
                try:
                    self._count_new_turns_of(item, self.counter.count_many([t["content"] for t in item.new_turns]))
                    counted.append(item)
                except Exception as exc:
                    out.append(self._failed(item, f"its tokens could not be counted: {_why(exc)}"))
            return counted
        position = 0
        for item in accepted:
            self._count_new_turns_of(item, counts[position : position + len(item.new_turns)])
            position += len(item.new_turns)
        return accepted

    @staticmethod
    def _count_new_turns_of(item: Accepted, counts: Sequence[int]) -> None:
        for turn, count in zip(item.new_turns, counts, strict=True):
            turn["tokens"] = count

    async def _build_envelopes(
        self, accepted: list[Accepted], out: list[Outgoing]
    ) -> tuple[list[Outgoing], list[Accepted], bool]:
        """Envelopes for the requests not processed before, those requests, and
        whether Redis was unreachable (then every request goes on without history).
        A request whose own step fails (its stored history unreadable, its envelope
        not encodable) is answered `error` in `out`; the others go on."""
        if fault_armed("processor.wave_fails"):  # a step for the whole wave failing (its test)
            raise RuntimeError("injected fault processor.wave_fails")
        fresh, degraded = await self._load(accepted, out)
        # not fresh: claimed before, so forwarded and acknowledged once: no output
        items = [item for item, is_fresh in zip(accepted, fresh, strict=True) if is_fresh]
        for item, is_fresh in zip(accepted, fresh, strict=True):
            if not is_fresh:
                self.gate.take_back(item)
        items = await self.gate.within_quotas(items, out, self._refuse_item, self._quota_tokens)
        relevant = [item for item in items if item.strategy == "relevance" and item.history]
        if relevant:
            await asyncio.to_thread(self.relevance.score_or_fall_back, relevant)  # type: ignore[arg-type]
        envelopes, built = [], []
        for item in items:
            try:
                envelopes.append(self.envelopes.build(item, degraded))
                built.append(item)
            except Exception as exc:
                log.exception("envelope of request %r", item.request["request_id"][:80])
                out.append(self._failed(item, f"its context could not be built: {_why(exc)}"))
                self.gate.take_back(item)
        scored = [item for item in relevant if item.new_vectors and item in built]
        if scored and not degraded:
            await self._store_embeddings(scored)
        return envelopes, built, degraded

    async def _load(self, accepted: list[Accepted], out: list[Outgoing]) -> tuple[list[bool], bool]:
        """One pipeline: per request the read script (and the cached embeddings for
        `relevance`). Fills each item's history; a request id claimed before is not
        fresh, nor is one whose history cannot be read (answered `error` in `out`).
        Redis down: every request fresh, degraded."""
        if time.monotonic() < self._redis_down_until:
            return [True] * len(accepted), True
        rooms: list[int | Exception | None] = []
        for item in accepted:
            try:
                rooms.append(self.envelopes.history_room(item))
            except Exception as exc:
                rooms.append(exc)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item, room in zip(accepted, rooms, strict=True):
                    request = item.request
                    tenant, session = request["tenant"], request["session_id"]
                    if isinstance(room, Exception):
                        continue
                    self.history.load(pipe, request["request_id"], tenant, session, room)
                    if item.strategy == "relevance":
                        self.history.load_embeddings(pipe, tenant, session)
                # a command's own error (a key of the wrong type) is its request's alone
                results = iter(await pipe.execute(raise_on_error=False))
        except (RedisError, OSError) as exc:
            self._redis_down(exc)
            return [True] * len(accepted), True
        metrics.REDIS_DEGRADED.labels(STAGE).set(0)
        fresh = []
        for item, room in zip(accepted, rooms, strict=True):
            if isinstance(room, Exception):
                out.append(self._failed(item, f"its new turns could not be fitted: {_why(room)}"))
                fresh.append(False)
                continue
            read = next(results)
            vectors = next(results) if item.strategy == "relevance" else {}
            try:
                if isinstance(read, Exception):
                    raise read
                history = loaded_history(read)
            except Exception as exc:
                out.append(self._failed(item, f"the history of its session could not be read: {_why(exc)}"))
                fresh.append(False)
                continue
            fresh.append(history is not None)
            if history is not None:
                item.history = history
            # an unreadable embeddings cache is only recomputed
            item.cached_vectors = vectors if isinstance(vectors, dict) else {}
        return fresh, False

    async def _claim_and_append(self, items: list[Accepted]) -> None:
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
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._redis_down(exc)
            return
        for item, result in zip(items, results, strict=True):
            if isinstance(result, Exception):  # its own key's error: forwarded, not claimed
                log.warning("request %r not claimed: %r", item.request["request_id"][:80], result)

    async def _store_embeddings(self, items: list[Accepted]) -> None:
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
                # a session's own error (its hash of the wrong type) costs only its cache
                await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._redis_down(exc)

    def _redis_down(self, exc: Exception) -> None:
        log.warning("redis unreachable, going on degraded for %.0fs: %s", REDIS_RETRY_S, exc)
        self._redis_down_until = time.monotonic() + REDIS_RETRY_S
        metrics.REDIS_DEGRADED.labels(STAGE).set(1)


def _why(exc: BaseException) -> str:
    """An exception as a reply's error text: its type and message, bounded."""
    return f"{type(exc).__name__}: {exc}"[:WHY_MAX_CHARS]


def _waves(items: list[Accepted]) -> list[list[Accepted]]:
    """Splits a batch so that each conversation has at most one request per wave, in
    order: a request then reads the history its predecessor in the batch appended."""
    waves: list[list[Accepted]] = []
    seen: dict[tuple[str, str], int] = {}
    for item in items:
        key = (item.request["tenant"], item.request["session_id"])
        index = seen.get(key, -1) + 1
        seen[key] = index
        if index == len(waves):
            waves.append([])
        waves[index].append(item)
    return waves
