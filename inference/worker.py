"""An inference worker: one member of the workers' consumer group on tidegate.contexts.

Per batch: decode envelopes (undecodable -> dead letter), answer expired ones
without the model, generate the rest, append the assistant turns to the history,
produce every reply, wait for the broker's acknowledgement, and only then commit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from inference.batcher import Batcher
from inference.models import Generation, ModelRunner, Prompt
from inference.response_cache import cache_key, cacheable, lookup, store
from processors.history import HistoryWriter
from schemas import SerializationError, get_codec
from streams.config import Settings
from streams.devstack import READY_MARKER
from streams.kafka import consumer_config, producer_config
from streams.outgoing import Outgoing, build_reply, dead_letter, now_ms, reply_message

log = logging.getLogger(__name__)

STAGE = "workers"


def consumer_settings(settings: Settings) -> dict[str, Any]:
    """Bounded prefetch: librdkafka keeps at most a few batches ahead, in small
    per-partition fetches; fairness across partitions comes from the batcher's
    per-partition share of its pool (inference/batcher.py)."""
    return consumer_config(
        settings,
        settings.worker_group,
        **{
            "queued.min.messages": max(8, settings.max_batch),
            # librdkafka waits this long before refetching a partition whose local queue
            # was full (default 1 s): with pause/resume that delays whole partitions
            "fetch.queue.backoff.ms": 10,
            "queued.max.messages.kbytes": 4096,
            "max.partition.fetch.bytes": 32 * 1024,
        },
    )


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a reply; the batch is not committed."""


class InferenceWorker:
    def __init__(self, settings: Settings, runner: ModelRunner) -> None:
        self.settings = settings
        self.runner = runner
        self.codec = get_codec()
        self.batcher = Batcher(settings.max_batch, settings.max_wait_ms, settings.prefetch_limit)
        self.history = HistoryWriter(settings.history_ttl_s, settings.history_max_turns)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.consumer = Consumer(consumer_settings(settings))
        self.producer = Producer(producer_config(settings))
        self.stopping = threading.Event()
        self._announced = False

    def warm_up(self) -> None:
        """One batch through the model before joining, so the first real batch is not slow."""
        self.runner.generate([Prompt([{"role": "user", "content": "Hello"}], 4)])

    def run(self) -> None:
        self.consumer.subscribe([self.settings.topics.contexts], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self.stopping.is_set():
                batch = self.batcher.collect(self.consumer)
                if batch:
                    self.process(batch)
        finally:
            self.consumer.close()
            self.producer.flush(10)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("worker assigned %d partitions", len(partitions))
        if not self._announced:
            self._announced = True
            print(READY_MARKER, flush=True)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.batcher.drop_partitions({(tp.topic, tp.partition) for tp in partitions})

    def process(self, records: Sequence[Message]) -> None:
        batch_started = now_ms()
        outgoing: list[Outgoing] = []
        work: list[tuple[dict[str, Any], Prompt]] = []
        for record in records:
            error = record.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", error)
                continue
            try:
                envelope = self.codec.decode(record.value(), "ContextEnvelope")[1]
            except SerializationError as exc:
                outgoing.append(
                    dead_letter(
                        self.settings.topics.dead_letter,
                        record.value(),
                        record.key(),
                        reason=str(exc),
                        source_topic=record.topic(),
                        partition=record.partition(),
                        offset=record.offset(),
                        stage=STAGE,
                    )
                )
                continue
            if envelope["deadline_ms"] and batch_started > envelope["deadline_ms"]:
                outgoing.append(
                    self._reply(envelope, "expired", batch_started, error="deadline passed before inference")
                )
                continue
            work.append((envelope, self._prompt(envelope)))
        if work:
            outgoing.extend(self._generate(work, batch_started))
        self._deliver(outgoing)
        self._commit(records)

    def _prompt(self, envelope: dict[str, Any]) -> Prompt:
        messages = [{"role": "system", "content": envelope["system_prompt"]}] if envelope["system_prompt"] else []
        if envelope["summary"]:
            messages.append({"role": "system", "content": f"Earlier in this conversation: {envelope['summary']}"})
        messages.extend({"role": t["role"], "content": t["content"]} for t in envelope["turns"])
        return Prompt(messages, envelope["max_new_tokens"], envelope["temperature"])

    def _generate(self, work: list[tuple[dict[str, Any], Prompt]], batch_started: int) -> list[Outgoing]:
        keys, cached = self._cached(work)
        todo = [i for i, hit in enumerate(cached) if hit is None]
        started = time.monotonic()
        try:
            generated = self.runner.generate([work[i][1] for i in todo]) if todo else []
        except Exception as exc:
            log.exception("model %s failed on a batch of %d", self.runner.name, len(todo))
            return [self._reply(e, "error", batch_started, error=f"model failed: {exc!r}") for e, _ in work]
        inference_ms = int((time.monotonic() - started) * 1000) if todo else 0
        generations = list(cached)
        for i, g in zip(todo, generated, strict=True):
            generations[i] = g
        self._remember(keys, todo, generated)
        self._append_history(work, generations)
        return [
            self._reply(
                envelope,
                "ok",
                batch_started,
                text=g.text,
                tokens_in=g.tokens_in,
                tokens_out=g.tokens_out,
                cache_hit=hit is not None,
                inference_ms=0 if hit is not None else inference_ms,
            )
            for (envelope, _), g, hit in zip(work, generations, cached, strict=True)
        ]

    def _cached(self, work: list[tuple[dict[str, Any], Prompt]]) -> tuple[list[str | None], list[Generation | None]]:
        """Cache keys (None: not cacheable) and hits for greedy prompts, in one MGET;
        a None hit is where the model must run."""
        off = [None] * len(work)
        if not self.settings.response_cache_ttl_s:
            return off, list(off)
        keys = [cache_key(self.runner.name, p) if cacheable(p) else None for _, p in work]
        index = [i for i, key in enumerate(keys) if key is not None]
        try:
            found = lookup(self.redis, [keys[i] for i in index])
        except (redis.RedisError, OSError) as exc:
            log.warning("redis unreachable; response cache skipped: %s", exc)
            return keys, list(off)
        hits: list[Generation | None] = list(off)
        for i, g in zip(index, found, strict=True):
            hits[i] = g
        return keys, hits

    def _remember(self, keys: list[str | None], todo: list[int], generated: list[Generation]) -> None:
        entries = [(key, g) for i, g in zip(todo, generated, strict=True) if (key := keys[i]) is not None]
        try:
            store(self.redis, entries, self.settings.response_cache_ttl_s)
        except (redis.RedisError, OSError) as exc:
            log.warning("redis unreachable; responses not cached: %s", exc)

    def _reply(
        self, envelope: dict[str, Any], status: str, batch_started: int, *, inference_ms: int = 0, **fields: Any
    ) -> Outgoing:
        timings = {
            "queued_ms": envelope["queued_ms"],
            "context_ms": envelope["context_ms"],
            "batch_wait_ms": max(0, batch_started - envelope["forwarded_ms"]),
            "inference_ms": inference_ms,
        }
        reply = build_reply(
            envelope, status, model=self.runner.name, degraded=envelope["degraded"], timings=timings, **fields
        )
        return reply_message(reply, envelope["reply_to"], envelope["reply_encoding"])

    def _append_history(self, work: list[tuple[dict[str, Any], Prompt]], generations: list[Any]) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for (envelope, _), g in zip(work, generations, strict=True):
                    turn = {"role": "assistant", "content": g.text, "tokens": self.runner.count_turn_tokens(g)}
                    self.history.append(pipe, envelope["tenant"], envelope["session_id"], [turn])
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("redis unreachable; assistant turns not stored: %s", exc)

    def _deliver(self, outgoing: list[Outgoing]) -> None:
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for o in outgoing:
            self.producer.produce(o.topic, o.value, o.key, headers=o.headers, on_delivery=on_delivery)
        remaining = self.producer.flush(30)
        if remaining or failures:
            raise DeliveryError(f"{remaining} replies unacknowledged, failures: {failures[:3]}")

    def _commit(self, records: Sequence[Message]) -> None:
        """Commits past the answered records, but never past a record still pooled."""
        pooled = self.batcher.pending_offsets()
        last: dict[tuple[str, int], int] = {}
        for r in records:
            if r.error() is None:
                key = (r.topic(), r.partition())
                last[key] = max(last.get(key, -1), r.offset())
        offsets = [TopicPartition(t, p, min(o + 1, pooled.get((t, p), o + 1))) for (t, p), o in last.items()]
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=False)
