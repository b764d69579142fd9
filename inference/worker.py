"""An inference worker: one member of its pool's group on the pool's contexts topic
(TIDEGATE_POOL, inference/pools.py; without a fleet file: the workers' group on
tidegate.contexts). Its reply counts go to the outcomes topic (inference/outcomes.py).

Each record is decoded once, when it enters the batcher's pool (inference/jobs.py;
undecodable -> dead letter); expired envelopes are answered without the model,
greedy repeats from the response cache (inference/session_store.py). The rest are
generated in one of two ways (`TIDEGATE_BATCHING`):

- `continuous` (default): requests join the running batch at the next decode step
  and leave it when they end (inference/engine.py), each replied to at once;
- `static`: a whole batch through transformers' `generate`, replied to together.

Either way a record's offset is committed only after the broker acknowledged its
reply (inference/commits.py), and its assistant turn is appended to the history.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from inference.batcher import Batcher
from inference.commits import ReplyCommitter
from inference.engine import EngineStats, Request
from inference.jobs import STAGE, Job, decode_fetched, decode_job, record_dead_letter
from inference.outcomes import OutcomeReporter
from inference.runners import Generation, ModelRunner, Prompt
from inference.session_store import STATS_KEY, SessionStore
from streams import metrics
from streams.config import Settings
from streams.faults import fault_armed
from streams.fleet import DEFAULT_POOL, Pool, default_fleet
from streams.kafka import consumer_config, producer_config
from streams.lifecycle import announce_ready
from streams.outgoing import Outgoing, build_reply, chunk_message, now_ms, reply_message
from streams.reply_topics import ReplyTopics

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.1  # continuous batching: commits of answered records, at most this often
CANCEL_CHECK_S = 0.2  # continuous batching: how often the running rows' cancellations are read


def consumer_settings(settings: Settings) -> dict[str, Any]:
    """Bounded prefetch: librdkafka keeps at most a few batches ahead, in small
    per-partition fetches; fairness across partitions comes from the batcher's
    per-partition share of its pool (inference/batcher.py)."""
    config = consumer_config(
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
    if settings.worker_group_protocol == "consumer":
        # KIP-848: the broker assigns partitions and times sessions out
        # (group.consumer.* in tidegate/broker_files/broker.properties); these are refused here
        for key in ("session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy"):
            config.pop(key, None)
        config["group.protocol"] = "consumer"
    return config


class InferenceWorker:
    def __init__(self, settings: Settings, runner: ModelRunner, pool: Pool | None = None) -> None:
        self.settings = settings
        self.runner = runner
        # the pool's contexts topic (its group and engine are in `settings`: inference/pools.py)
        self.pool = pool if pool is not None else default_fleet(settings).pools[DEFAULT_POOL]
        self.batcher = Batcher(
            settings.max_batch,
            settings.max_wait_ms,
            settings.prefetch_limit,
            token_budget=settings.batch_tokens,
            cost=self._cost,
            on_fetch=lambda records: decode_fetched(records, self.jobs, runner, settings, self.reply_topics),
        )
        self.store = SessionStore(settings, runner)
        self.consumer = Consumer(consumer_settings(settings))
        self.replies = ReplyCommitter(Producer(producer_config(settings)))
        self.reply_topics = ReplyTopics(settings, self.replies.producer)
        self.jobs: dict[tuple[str, int, int], Job] = {}
        make_engine = getattr(runner, "engine", None)
        continuous = settings.batching == "continuous" and make_engine is not None
        self.engine = make_engine(settings.prefix_cache_entries, settings.prefix_cache_bytes) if continuous else None
        self.stats = self.engine.stats if self.engine is not None else EngineStats()
        self.stats_key = f"{STATS_KEY}{settings.topic_prefix}{socket.gethostname()}:{os.getpid()}"
        self.outcomes = OutcomeReporter(settings, self.pool.name, f"{socket.gethostname()}:{os.getpid()}")
        # names each streamed run of a request on its chunks (instance.attempt): a
        # redelivery, or this worker's row of a revoked partition beside the new owner's,
        # streams apart from the other run (streams/stitching.py)
        self.instance = uuid.uuid4().hex[:12]
        self._attempts = itertools.count()
        self.stopping = threading.Event()
        self._announced = False
        self._last_batch = 0
        self._committed_at = 0.0
        self._cancel_checked_at = 0.0
        self._stats_at = 0.0

    def warm_up(self) -> None:
        """One request through the model before joining, so the first real batch is not slow."""
        prompt = Prompt([{"role": "user", "content": "Hello"}], 4)
        if self.engine is None:
            self.runner.generate([prompt])
            return
        ids, prefix_len = self.runner.encode(prompt)
        self.engine.add([Request(None, ids, prompt.max_new_tokens, 0.0, prefix_len)])
        while self.engine.busy:
            self.engine.step()
        self.engine.stats = self.stats = EngineStats()

    def run(self) -> None:
        self.consumer.subscribe([self.pool.contexts_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self.stopping.is_set():
                if self.engine is None:
                    # the batching window only while requests come in groups: after a
                    # lone request the next batch is what is fetched when it arrives
                    batch = self.batcher.collect(self.consumer, linger=self._last_batch > 1)
                    self._last_batch = len(batch) or self._last_batch
                    if batch:
                        self.process(batch)
                else:
                    self.continuous_round()
                self._publish_stats()
        finally:
            self._finish_in_flight(self.settings.shutdown_grace_s)
            self.replies.producer.flush(10)
            self._commit(asynchronous=False)
            self.consumer.close()
            self.outcomes.close()

    def _finish_in_flight(self, grace_s: float) -> None:
        """On the way out (SIGTERM): the rows already generating run to their end, for
        up to `grace_s`, and are replied to; what is only pooled is left uncommitted,
        for the next owner of its partition. Rows still running past the grace are
        dropped uncommitted too."""
        if self.engine is None or not self.engine.busy:
            return
        deadline = time.monotonic() + grace_s
        log.warning("stopping: finishing %d rows in flight (up to %.0fs)", len(self.engine.active), grace_s)
        try:
            while self.engine.busy and time.monotonic() < deadline:
                self._run_engine(self.engine.step, [r.tag for r in self.engine.active])
                self.replies.poll()
        except Exception:
            log.exception("rows in flight not finished; they are left uncommitted")
        if self.engine.busy:
            log.warning("stopping: %d rows dropped uncommitted after the grace", len(self.engine.reset()))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("worker assigned %d partitions", len(partitions))
        self.replies.assign((tp.topic, tp.partition) for tp in partitions)
        metrics.REBALANCES.labels(STAGE).inc()
        metrics.ASSIGNED_PARTITIONS.labels(STAGE).set(self.replies.ledger.owned_count())
        if not self._announced:
            self._announced = True
            announce_ready()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._commit(asynchronous=False)
        self.batcher.drop_partitions(revoked)
        self.replies.forget(revoked)
        metrics.ASSIGNED_PARTITIONS.labels(STAGE).set(self.replies.ledger.owned_count())
        self.jobs = {k: j for k, j in self.jobs.items() if (k[0], k[1]) not in revoked}

    # -- decoding, once per record --------------------------------------------

    def _job(self, record: Message) -> Job:
        key = (record.topic(), record.partition(), record.offset())
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = decode_job(record, self.runner, self.settings, self.reply_topics)
        return job

    def _cost(self, record: Message) -> int:
        """Prompt tokens, for the batch's token budget; 0 where no model is needed."""
        return len(self._job(record).ids)

    def _take(self, records: Sequence[Message]) -> tuple[list[tuple[Message, Outgoing]], list[Job]]:
        """Takes records from the pool: answers those that need no model (dead letter,
        expired, response-cache hit) and returns them with the jobs left to generate."""
        started = now_ms()
        answered: list[tuple[Message, Outgoing]] = []
        jobs: list[Job] = []
        for record in records:
            error = record.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", error)
                continue
            key = (record.topic(), record.partition(), record.offset())
            job = self.jobs.pop(key, None)
            if job is None or job.record is not record:  # the ledger answers the very record it took
                job = decode_job(record, self.runner, self.settings, self.reply_topics)
            job.started_ms = started
            self.replies.take([record])
            metrics.QUEUE_WAIT.observe(max(0, started - record.timestamp()[1]) / 1000)
            if job.dead_letter is not None:
                metrics.DEAD_LETTERS.labels(STAGE, "undecodable").inc()
                answered.append((record, job.dead_letter))
            elif job.invalid is not None:
                answered.append((record, self._reply(job, "invalid", error=job.invalid)))
            elif job.expired(started):
                answered.append((record, self._reply(job, "expired", error="deadline passed before inference")))
            else:
                jobs.append(job)
        cancelled = self.store.cancelled(jobs)
        for job, gone in zip(jobs, cancelled, strict=True):
            if gone:
                answered.append(
                    (job.record, self._reply(job, "expired", error="cancelled by the caller before inference"))
                )
        jobs = [j for j, gone in zip(jobs, cancelled, strict=True) if not gone]
        hits = self.store.cached(jobs)
        for job, hit in zip(jobs, hits, strict=True):
            if hit is not None:
                self.store.append_turns([job], [hit])
                answered.append((job.record, self._ok(job, hit, cache_hit=True)))
        return answered, [j for j, hit in zip(jobs, hits, strict=True) if hit is None]

    # -- static batching ------------------------------------------------------

    def process(self, records: Sequence[Message]) -> None:
        """A whole batch through the runner's `generate`; replies and commit after it."""
        answered, jobs = self._take(records)
        if jobs:
            answered.extend(self._generate_static(jobs))
        self.replies.send(answered)
        self.replies.flush(30)
        self._commit(asynchronous=False)

    def _generate_static(self, jobs: list[Job]) -> list[tuple[Message, Outgoing]]:
        started = time.monotonic()
        try:
            if fault_armed("worker.model_error"):  # a pool whose model fails (tests/test_fleet_pools.py)
                raise RuntimeError("injected by TIDEGATE_FAULTS")
            generated = self.runner.generate([j.prompt for j in jobs if j.prompt is not None])
        except Exception as exc:
            log.exception("model %s failed on a batch of %d", self.runner.name, len(jobs))
            return [(j.record, self._reply(j, "error", error=f"model failed: {exc!r}")) for j in jobs]
        inference_ms = int((time.monotonic() - started) * 1000)
        metrics.BATCH_SIZE.observe(len(jobs))
        self._count_static(jobs, generated)
        self._finished(jobs, generated)
        return [(j.record, self._ok(j, g, inference_ms=inference_ms)) for j, g in zip(jobs, generated, strict=True)]

    def _count_static(self, jobs: list[Job], generated: list[Generation]) -> None:
        """generate() pads prompts to the longest and steps every row until the last ends."""
        lengths = [len(j.ids) for j in jobs]
        steps = max(g.tokens_out for g in generated)
        s = self.stats
        s.prefill_tokens += sum(lengths)
        s.prefill_padded += len(jobs) * max(lengths) - sum(lengths)
        s.steps += steps
        s.rows_stepped += len(jobs) * steps
        s.rows_idle += sum(steps - g.tokens_out for g in generated)

    # -- continuous batching --------------------------------------------------

    def continuous_round(self) -> None:
        """Admits what fits into the running batch, runs one decode step, replies to
        the requests that ended, and commits what is answered."""
        assert self.engine is not None
        busy = self.engine.busy
        if not busy and not self.batcher.pool:
            # about to wait for work: let the broker ack and commit first. Not while the
            # pool holds work: a flush and a synchronous commit per cohort of rows that
            # ended together would keep the worker waiting on the broker; the periodic
            # commit below covers a busy worker.
            self.replies.flush(10)
            self._commit(asynchronous=False)
        room = self.settings.join_room(len(self.engine.active), busy)
        # room 0: keeps fetching; an idle engine starts at once (no batching window)
        records = self.batcher.collect(self.consumer, room, wait=not busy, linger=False)
        if records:
            answered, jobs = self._take(records)
            self.replies.send(answered)
            if jobs:
                self._run_engine(lambda: self.engine.add([self._request(j) for j in jobs]), jobs)
                first_token_ms = now_ms()  # prefill samples each new row's first token
                for j in jobs:
                    assert j.envelope is not None
                    metrics.TIME_TO_FIRST_TOKEN.observe(max(0, first_token_ms - j.envelope["created_ms"]) / 1000)
        if self.engine.busy:
            metrics.BATCH_SIZE.observe(len(self.engine.active))
            metrics.DECODE_STEPS.inc()
            self._run_engine(self.engine.step, [r.tag for r in self.engine.active])
            self._send_chunks()
            self._drop_cancelled()
        self.replies.poll()
        if time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
            self._commit(asynchronous=True)

    def _drop_cancelled(self) -> None:
        """Rows whose callers went away leave the batch (checked at most every
        CANCEL_CHECK_S, one MGET): answered `expired`, their text not kept."""
        assert self.engine is not None
        now = time.monotonic()
        if not self.engine.active or now - self._cancel_checked_at < CANCEL_CHECK_S:
            return
        self._cancel_checked_at = now
        rows = list(self.engine.active)
        gone = [r for r, flag in zip(rows, self.store.cancelled([r.tag for r in rows]), strict=True) if flag]
        if not gone:
            return
        self.engine.drop(gone)
        self.replies.send(
            [
                (
                    r.tag.record,
                    self._reply(r.tag, "expired", error=f"cancelled by the caller after {len(r.out)} tokens"),
                )
                for r in gone
            ]
        )

    def _send_chunks(self) -> None:
        """The text streamed requests generated since their last chunk, as chunks to
        their reply topic (not tied to offsets: the reply that ends the stream is).
        Text ending in half a character waits for the next step."""
        assert self.engine is not None
        now = time.monotonic()
        for row in self.engine.active:
            job: Job = row.tag
            if not job.streams or now - job.chunked_at < self.settings.stream_interval_ms / 1000:
                continue
            text = self.runner.finish(row.out, 0).text  # type: ignore[attr-defined]
            if len(text) <= len(job.streamed) or not text.startswith(job.streamed) or text.endswith("\ufffd"):
                continue
            job.generation = job.generation or f"{self.instance}.{next(self._attempts)}"
            self._send_chunk(job, text, len(row.out), now)

    def _send_chunk(self, job: Job, text: str, tokens_out: int, now: float) -> None:
        """What `text` adds to the job's stream, as its next chunk (local and remote pools);
        a chunk refused is text the reply still carries: logged only."""
        assert job.envelope is not None
        envelope = job.envelope
        new_text = text[len(job.streamed) :]
        o = chunk_message(
            envelope["request_id"], job.chunks_sent, new_text, tokens_out, envelope["reply_to"], job.generation
        )
        try:
            self.replies.producer.produce(o.topic, o.value, o.key, headers=o.headers)
        except (BufferError, KafkaException) as exc:
            log.warning("chunk for %s not sent: %s", envelope["request_id"], exc)
            return
        job.streamed, job.chunks_sent, job.chunked_at = text, job.chunks_sent + 1, now

    def _request(self, job: Job) -> Request:
        assert job.prompt is not None
        return Request(job, job.ids, job.prompt.max_new_tokens, job.prompt.temperature, job.prefix_len)

    def _run_engine(self, call: Callable[[], list[Request]], jobs: list[Job]) -> None:
        """Runs an engine call; on a model failure every job it touched gets an `error`
        reply and the running batch is dropped (its cache may be half-updated)."""
        assert self.engine is not None
        try:
            finished = call()
        except Exception as exc:
            log.exception("model %s failed with %d requests in the batch", self.runner.name, len(jobs))
            dropped = {id(j): j for j in [*jobs, *(r.tag for r in self.engine.reset())]}
            failed = [(j.record, self._reply(j, "error", error=f"model failed: {exc!r}")) for j in dropped.values()]
            self.replies.send(failed)
            return
        if not finished:
            return
        jobs_done: list[Job] = [r.tag for r in finished]
        generations = [self.runner.finish(r.out, len(r.ids)) for r in finished]  # type: ignore[attr-defined]
        self._finished(jobs_done, generations)
        self.replies.send(
            [
                (j.record, self._ok(j, g, inference_ms=int((time.monotonic() - r.admitted_at) * 1000)))
                for j, g, r in zip(jobs_done, generations, finished, strict=True)
            ]
        )

    # -- replies --------------------------------------------------------------

    def _finished(self, jobs: list[Job], generations: list[Generation]) -> None:
        metrics.TOKENS_GENERATED.inc(sum(g.tokens_out for g in generations))
        self.store.remember(jobs, generations)
        self.store.append_turns(jobs, generations)

    def _ok(self, job: Job, g: Generation, *, cache_hit: bool = False, inference_ms: int = 0) -> Outgoing:
        return self._reply(
            job,
            "ok",
            text=g.text,
            tokens_in=g.tokens_in,
            tokens_out=g.tokens_out,
            cache_hit=cache_hit,
            inference_ms=inference_ms,
        )

    def _reply(self, job: Job, status: str, *, inference_ms: int = 0, **fields: Any) -> Outgoing:
        envelope = job.envelope
        assert envelope is not None
        timings = {
            "queued_ms": envelope["queued_ms"],
            "context_ms": envelope["context_ms"],
            "batch_wait_ms": max(0, job.started_ms - envelope["forwarded_ms"]),
            "inference_ms": inference_ms,
        }
        # the model by its public id where the processors named it (an older envelope: the runner's)
        model = envelope.get("model") or self.runner.name
        reply = build_reply(envelope, status, model=model, degraded=envelope["degraded"], timings=timings, **fields)
        self.outcomes.count(status)
        metrics.END_TO_END.labels(status).observe(reply["timings"]["total_ms"] / 1000)
        out = reply_message(reply, envelope["reply_to"], envelope["reply_encoding"])
        out.fallback = record_dead_letter(job.record, self.settings, f"reply to {envelope['reply_to']!r} refused")
        return out

    # -- commits and stats ----------------------------------------------------

    def _commit(self, asynchronous: bool) -> None:
        """Commits what is answered. A refused commit (this member was fenced: stopped
        past its session timeout, say) is logged, not fatal: the group's new owner of
        those partitions answers and commits them, and this worker rejoins."""
        self._committed_at = time.monotonic()
        try:
            self.replies.commit(self.consumer, self.batcher.pending_offsets(), asynchronous)
        except KafkaException as exc:
            log.warning("commit refused, the group has moved on: %s", exc)

    def _publish_stats(self) -> None:
        self.outcomes.maybe_publish()
        if time.monotonic() - self._stats_at < self.settings.stats_interval_s:
            return
        self._stats_at = time.monotonic()
        metrics.PADDING_SHARE.set(self.stats.padding_share())
        self.store.publish_stats(self.stats_key, self.stats, "continuous" if self.engine else "static")
