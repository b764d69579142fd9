"""The processors' work on one batch of raw request records, independent of faust.

decode -> reply_to -> validate -> deadline -> token counts (one tokenizer call)
-> backpressure and fair share -> per request one Redis script, all in one
pipeline: dedupe, read the history the strategy needs -> quotas (only what is
forwarded is charged: processors/admission.py) -> compress -> ContextEnvelope ->
once acknowledged, claim and append the new turns.
Every input record yields exactly one output: an envelope, a reply, or a dead letter
(duplicates of an already forwarded request yield nothing). A refusal decided before
the claim was read is sent only for a request never claimed (processors/refusals.py);
a batch that fails as a whole answers only its records not answered yet (`answer`).
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
from conversation.refused_writes import RefusedWrites
from conversation.tokens import TokenCounter
from processors.admission import STAGE, Admission, AdmissionGate, NearFull, Release
from processors.envelopes import Accepted, EnvelopeBuilder, Incoming
from processors.fairness import FairShares
from processors.quotas import Quotas
from processors.refusals import Refusal, Refusals
from processors.relevance import RelevanceScorer
from processors.validation import invalid_reason
from schemas import SerializationError, get_codec
from streams import metrics
from streams.config import Settings
from streams.faults import fault_armed, fault_point
from streams.fleet import Fleet
from streams.outgoing import Outgoing, now_ms
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
        fleet: Fleet | None = None,  # the models and pools it routes to (None: FLEET_FILE's, or the default)
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
        self.history = HistoryWriter(settings.history_ttl_s, settings.history_max_turns, settings.tenant_max_sessions)
        self.refused_writes = RefusedWrites(STAGE, log)
        self.codec = get_codec()
        self._redis_down_until = 0.0
        self._system_tokens = counter.count(settings.system_prompt)
        self.relevance = RelevanceScorer()
        self.envelopes = EnvelopeBuilder(settings, counter, self.codec, fleet)
        self.refusals = Refusals(settings, redis, self.history, self._redis_unreachable, self._redis_down)
        # id -> record: the records of the batch in hand whose outputs were delivered
        # (or that yield none); the failure path answers only the others
        self._answered: dict[int, Incoming] = {}

    async def answer(self, batch: Sequence[Incoming], deliver: Deliver) -> None:
        """`handle`, and should it fail as a whole, the failure path: each record
        it had not answered yet is answered `error` or dead-lettered, never skipped,
        and never answered twice (a wave delivered before the failure keeps its
        envelopes and replies alone)."""
        try:
            await self.handle(batch, deliver)
        except Exception as exc:  # never commit past a failure silently; never fail a batch's callers
            log.exception("batch of %d failed; answering each record not yet answered", len(batch))
            await deliver(await self.failed_batch(batch, exc))

    async def handle(self, batch: Sequence[Incoming], deliver: Deliver) -> None:
        """Handles a batch: every output goes through `deliver`, which returns once the
        broker acknowledged it. A request's claim and turns are written to Redis only
        after its envelope was acknowledged (conversation/history.py). Requests of one
        conversation go in waves, one per wave, so each sees the turns of the one
        before it in the batch."""
        self._answered = {}
        out: list[Outgoing] = []
        refusals: list[Refusal] = []  # decided before their claims were read
        accepted: list[Accepted] = []
        decoded = [self._guarded(record, self._decode, record) for record in batch]
        if self.reply_topics is not None:  # the batch's unseen reply topics in one listing, off the loop
            await self.reply_topics.prepare(d[1]["reply_to"] for d in decoded if isinstance(d, tuple))
        for result in decoded:
            if isinstance(result, tuple):
                result = self._guarded(result[0], self._admit_checked, *result)
            if isinstance(result, Outgoing):
                out.append(result)
            elif isinstance(result, Refusal):
                refusals.append(result)
            elif result is not None:
                accepted.append(result)
        if accepted:
            accepted = self._count_new_turns(accepted, refusals)
            accepted = self.gate.downstream(accepted, refusals, self._refusal)
        if fault_armed("processor.batch_fails"):  # a step for the whole batch failing (its test)
            raise RuntimeError("injected fault processor.batch_fails")
        out += await self.refusals.unless_claimed(refusals)
        waves = _waves(accepted)
        for index, wave in enumerate(waves):
            wave_out: list[Outgoing] = []  # the wave's own answers (failed alone, over quota)
            try:
                envelopes, forwarded, degraded = await self._build_envelopes(wave, wave_out)
            except Exception as exc:  # a step for the whole wave failed: each request not answered yet
                log.exception("building %d envelopes failed; answering each `error`", len(wave))
                why = f"processor error: {_why(exc)}"
                rest = [item for item in wave if not item.taken_back and not item.answered]
                for item in rest:
                    self.gate.take_back(item)
                wave_out += await self.refusals.unless_claimed([self._refusal(item, "error", why) for item in rest])
                envelopes, forwarded, degraded = [], [], True
            out += wave_out
            fault_point("processor.before_forward")  # history read, nothing forwarded or claimed
            await deliver(out + envelopes)
            out = []
            later = {id(item.record) for next_wave in waves[index + 1 :] for item in next_wave}
            self._answered = {id(record): record for record in batch if id(record) not in later}
            fault_point("processor.after_forward")  # forwarded, not yet claimed
            if not degraded:
                await self._claim_and_append(forwarded)
        if not waves:
            await deliver(out)

    async def failed_batch(self, batch: Sequence[Incoming], exc: Exception) -> list[Outgoing]:
        """Outputs for the records of a batch whose handling failed in a step not
        expected to, that `handle` had not answered yet: each is answered `error`
        where a reply can be built and it was never claimed, else dead-lettered."""
        why = f"processor error: {_why(exc)}"
        out, refusals = [], []
        for record in batch:
            if self._answered.get(id(record)) is record:  # its output was delivered
                continue
            try:
                request, encoding = self.codec.decode_message(record.value, record.headers, "InferenceRequest")
                tenant = self.settings.topics.tenant_of(record.topic)
                request["tenant"] = tenant or request["tenant"]
                if reply_to_reason(request["reply_to"], self.settings, tenant) is None:
                    refusals.append(Refusal(record, request, encoding, now_ms(), "error", why))
                    continue
            except Exception:  # undecodable, or a field the reply needs is broken: no reply
                log.debug("no reply for a record of a failed batch", exc_info=True)
            out.append(self.refusals.dead_letter(record, why, "processor_error"))
        return await self.refusals.unless_claimed(refusals) + out

    def _failed(self, item: Accepted, reason: str) -> Outgoing:
        """The `error` reply of an admitted request that failed alone, its claim read."""
        log.warning("request %r failed alone: %s", item.request["request_id"][:80], reason)
        return self._refuse_item(item, "error", reason, None, STAGE)

    def _guarded(self, record: Incoming, step: Callable[..., Any], *args: Any) -> Any:
        """`step(*args)` for one record. Whatever goes wrong with one record (a crafted
        field the checks missed) is that record's dead letter, never its batch's."""
        try:
            return step(*args)
        except Exception as exc:
            log.exception("topic=%s partition=%d offset=%d failed alone", record.topic, record.partition, record.offset)
            return self.refusals.dead_letter(record, f"processor error on this record: {exc!r}", "processor_error")

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
            return self.refusals.dead_letter(record, str(exc), "undecodable")
        return record, request, encoding, started

    def _admit_checked(
        self, record: Incoming, request: dict[str, Any], encoding: str, started: int
    ) -> Outgoing | Refusal | Accepted | None:
        """The record's dead letter, its refusal, or the accepted request."""
        tenant = self.settings.topics.tenant_of(record.topic)
        if tenant is not None:  # its principal may write only there: the topic says who sent it
            request["tenant"] = tenant
        if self.reply_topics is not None:
            unanswerable = self.reply_topics.reason(request["reply_to"], tenant, ask=False)
        else:
            unanswerable = reply_to_reason(request["reply_to"], self.settings, tenant)
        if unanswerable is not None:
            return self.refusals.dead_letter(record, unanswerable, "unanswerable")
        if not request["created_ms"]:
            request["created_ms"] = started
        reason = invalid_reason(request, self.settings, self.envelopes.fleet)
        if reason is not None:
            return Refusal(record, request, encoding, started, "invalid", reason)
        if request["deadline_ms"] and started > request["deadline_ms"]:
            late = started - request["deadline_ms"]
            return Refusal(
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

    @staticmethod
    def _refusal(
        item: Accepted, status: str, error: str, retry_after_ms: int | None = None, stage: str = STAGE
    ) -> Refusal:
        """A refusal of `item` decided before its claim was read."""
        return Refusal(item.record, item.request, item.encoding, item.started_ms, status, error, retry_after_ms, stage)

    def _refuse_item(self, item: Accepted, status: str, error: str, retry_after_ms: int | None, stage: str) -> Outgoing:
        """The reply that refuses `item`, its claim read (it was never claimed)."""
        item.answered = True  # by identity: request ids are the callers' and may repeat across tenants
        return self.refusals.reply(self._refusal(item, status, error, retry_after_ms, stage))

    def _count_new_turns(self, accepted: list[Accepted], refusals: list[Refusal]) -> list[Accepted]:
        """Token counts of every new turn in the batch, in one tokenizer call; where
        that call fails, each request is counted alone and one that fails is answered."""
        try:
            counts = self.counter.count_many([t["content"] for item in accepted for t in item.new_turns])
        except Exception:
            log.exception("counting the tokens of %d requests failed; counting each alone", len(accepted))
            counted = []
            for item in accepted:
                try:
                    item.count_new_turns(self.counter.count_many([t["content"] for t in item.new_turns]))
                    counted.append(item)
                except Exception as exc:
                    log.warning("request %r: its tokens could not be counted", item.request["request_id"][:80])
                    refusals.append(self._refusal(item, "error", f"its tokens could not be counted: {_why(exc)}"))
            return counted
        position = 0
        for item in accepted:
            item.count_new_turns(counts[position : position + len(item.new_turns)])
            position += len(item.new_turns)
        return accepted

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
        items = await self.gate.within_quotas(items, out, self._refuse_item, Accepted.quota_tokens)
        if fault_armed("processor.wave_fails_late"):  # a wave failing once some of it was answered (its test)
            raise RuntimeError("injected fault processor.wave_fails_late")
        relevant = [item for item in items if item.strategy == "relevance" and item.history]
        if relevant:
            await asyncio.to_thread(self.relevance.score_or_fall_back, relevant)  # type: ignore[arg-type]
        envelopes, built = [], []
        for item in items:
            try:
                envelope = self.envelopes.build(item, degraded)
                # refused for good by the broker (too large for the contexts topic, the topic
                # gone): its caller is answered instead of the batch being sent again forever
                refused = self._refusal(item, "error", "its context envelope was refused by the broker")
                envelope.fallback = self.refusals.reply(refused, counted=False)
                envelopes.append(envelope)
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
        if self._redis_unreachable():
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
        if fault_armed("processor.claim_fails"):  # a step after a delivered wave failing (its test)
            raise RuntimeError("injected fault processor.claim_fails")
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
        for result in results:
            if isinstance(result, Exception):  # its own key's error (OOM, say): forwarded, not claimed
                self.refused_writes.note("a request's claim and turns", result)

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

    def _redis_unreachable(self) -> bool:
        """True while the handler goes on without Redis (REDIS_RETRY_S after a failure)."""
        return time.monotonic() < self._redis_down_until

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
