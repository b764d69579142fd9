"""A worker of a remote pool (`engine: openai`): its pool's contexts topic, answered by
an OpenAI-compatible provider, at the pace the provider allows.

It is an InferenceWorker (inference/worker.py) in all but generation: the same group,
decoding, response cache, history turns, outcomes and reply path, and the same
ledger (inference/commits.py, inference/offsets.py): a record is committed only once
the broker acknowledged its reply, so the delivery guarantees hold as for local pools.
Generation is a call to the provider (inference/provider.py), at most `max_in_flight`
at once over one connection pool, paced to the pool's `rpm`/`tpm` share
(inference/remote.py). Streamed requests stream: the provider's deltas go out as
InferenceChunks (one generation name per run, streams/stitching.py). A caller who
cancels (inference/session_store.py `cancelled`) or whose deadline passes has its call
closed at the provider and is answered `expired`.

A 429 pauses the pool: the worker reads the wait from its headers
(inference/rate_limits.py; none given: 1 s, doubling to 60 s), publishes a PoolPause
to the pressure topic (streams/pauses.py) and stops sending; every worker of the pool
reads the pressure topic and stops with it, until the latest end any of them was
told (SHARED_POOL_PAUSES=false, the benchmark's baseline: its own pauses alone,
unpublished). Meanwhile its partitions are paused and the consumer still polled (the
group keeps its members), the requests in hand wait, and a request past its deadline
is answered `expired`; after the wait the refused request is sent again, answered once.
The routers treat the paused pool as full with a retry time that includes the wait.
5xx, timeouts and refused connections are answered `error`, which the outcomes
reporter counts toward the pool's circuit breaker (ops/breaker.py).

Calls out are bounded by a window, at most max_in_flight: halved whenever the pool
pauses (its own 429 or another worker's), grown by one per window of answers
(additive increase, multiplicative decrease, as TCP and Netflix's concurrency limits
do): after a pause the workers come back with a few calls, not all at once into the
limit that just refused them. In hand at most 2 x max_in_flight records (in flight
and waiting), fetching again once no more than max_in_flight are: the only queue
stays Kafka.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import time
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from inference.jobs import Job, decode_fetched
from inference.provider import Delta, Done, Event, Failed, Provider, RateLimited, chat_payload
from inference.remote import Pacer, RemoteRunner, RemoteStats, estimate_tokens
from inference.runners import Generation
from inference.worker import CANCEL_CHECK_S, COMMIT_INTERVAL_S, InferenceWorker
from streams import metrics
from streams.config import Settings
from streams.fleet import Pool
from streams.outgoing import Outgoing, now_ms
from streams.pauses import PoolPauses, pause_message
from streams.pressure_feed import PressureListener

log = logging.getLogger(__name__)

BUSY_POLL_S = 0.01  # the consumer's wait while calls are out: their events are read between polls
IDLE_POLL_S = 0.2
NO_WAIT_BACKOFF_S = (1.0, 60.0)  # a 429 that says no wait: 1 s, doubling in a row, up to 60 s
REPUBLISH_MS = 50  # a pause this much longer than the one known is published again
FINISH_POLL_S = 0.05
CALL_ENDS = ("ok", "rate_limited", "error", "invalid", "expired")  # tidegate_provider_calls{status}


@dataclass(slots=True)
class Call:
    job: Job
    started: float  # monotonic
    text: str = ""
    deltas: int = 0


class RemoteWorker(InferenceWorker):
    """A worker whose generation is the provider's: InferenceWorker's consuming,
    decoding (`_take`), replies (`_reply`, `_ok`, `_finished`), commits and rebalance
    handling, with a loop of its own in place of batching."""

    def __init__(self, settings: Settings, runner: RemoteRunner, pool: Pool, api_key: str | None) -> None:
        assert pool.remote is not None
        super().__init__(settings, runner, pool)
        self.spec = pool.remote
        self.member = self.outcomes.member
        self.provider = Provider(self.spec, api_key)
        self.listener = PressureListener(settings)  # the pool's pauses and its members
        # the pool's pauses as every worker of it knows them; SHARED_POOL_PAUSES off
        # (the benchmark's baseline): this worker's own alone, never published
        self.shared_pauses = settings.shared_pool_pauses
        self.pauses = self.listener.board.pauses if self.shared_pauses else PoolPauses()
        self.pacer = Pacer(self.spec.rpm, self.spec.tpm)
        self.remote_stats = RemoteStats()
        self.calls: dict[int, Call] = {}
        self.waiting: collections.deque[Job] = collections.deque()
        self._call_ids = itertools.count()
        self._held: set[tuple[str, int]] = set()  # partitions this worker paused
        self._paused_since: float | None = None
        self._no_wait_s = 0.0
        self.window = float(self.spec.max_in_flight)  # calls out at most now (AIMD)
        metrics.allow_label_values("pool", [pool.name])
        self._calls_ended = {s: metrics.PROVIDER_CALLS.labels(pool.name, s) for s in CALL_ENDS}
        self._paused_gauge = metrics.POOL_PAUSED.labels(pool.name)

    def warm_up(self) -> None:
        """Nothing to load: the model is at the provider."""

    def run(self) -> None:
        self.listener.start(stopping=self.stopping)
        self.provider.start()
        self.consumer.subscribe([self.pool.contexts_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self.stopping.is_set():
                self.remote_round()
                self._publish_stats()
        finally:
            self._finish_in_flight(self.settings.shutdown_grace_s)
            self.provider.close()
            self.replies.producer.flush(10)
            self._commit(asynchronous=False)
            self.consumer.close()
            self.outcomes.close()
            self.listener.close()

    def remote_round(self) -> None:
        """Reads what the provider said, sends what may go, fetches what fits, and
        commits what is answered."""
        self._read_events()
        self._drop_gone()
        self._send_ready()
        self._flow()
        room = max(1, 2 * self.spec.max_in_flight - len(self.calls) - len(self.waiting))
        records = [r for r in self.consumer.consume(room, self._poll_timeout()) if self._usable(r)]
        if records:
            decode_fetched(records, self.jobs, self.runner, self.settings, self.reply_topics)
            answered, jobs = self._take(records)
            self.replies.send(answered)
            self.waiting.extend(jobs)
            self._send_ready()
        self._send_deltas()
        self.replies.poll()
        if time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
            self._commit(asynchronous=True)

    @staticmethod
    def _usable(record: object) -> bool:
        error = record.error()  # type: ignore[attr-defined]
        if error is not None and error.code() != KafkaError._PARTITION_EOF:
            log.warning("consume error: %s", error)
        return error is None

    def _poll_timeout(self) -> float:
        if not self.provider.events.empty():
            return 0.0
        if self.calls:
            return BUSY_POLL_S
        return 5 * BUSY_POLL_S if self.waiting else IDLE_POLL_S

    # -- pausing ---------------------------------------------------------------

    def _paused(self) -> bool:
        """Whether the pool is paused now, noting when a pause begins and ends."""
        pause = self.pauses.current(self.pool.name)
        if pause is not None and self._paused_since is None:
            self._paused_since = time.monotonic()
            own = pause.member == self.member
            self.window = max(1.0, self.window / 2)
            self._paused_gauge.set(1)
            if own:
                self.remote_stats.pauses_own += 1
            else:
                self.remote_stats.pauses_joined += 1
            log.warning(
                "pool=%s paused for %d ms (%s%s)",
                self.pool.name,
                pause.until_ms - now_ms(),
                pause.reason,
                "" if own else f", told by {pause.member}",
            )
        elif pause is None and self._paused_since is not None:
            self.remote_stats.paused_ms += int((time.monotonic() - self._paused_since) * 1000)
            self._paused_since = None
            self._paused_gauge.set(0)
            log.info("pool=%s resumed", self.pool.name)
        return pause is not None

    def _pause(self, wait_s: float, why: str) -> None:
        """Pauses the pool for `wait_s`: here at once, and for every worker of the pool
        through the pressure topic (a longer pause already known stands)."""
        until_ms = now_ms() + int(wait_s * 1000)
        known = self.pauses.current(self.pool.name)
        self.pauses.note({"pool": self.pool.name, "until_ms": until_ms, "reason": why, "member": self.member})
        if not self.shared_pauses or (known is not None and until_ms <= known.until_ms + REPUBLISH_MS):
            return
        out = pause_message(self.settings.topics.pressure, self.pool.name, until_ms, why, self.member)
        try:  # the outcomes' producer: quick, never fatal (inference/outcomes.py)
            self.outcomes.producer.produce(out.topic, out.value, out.key, headers=out.headers)
        except (BufferError, KafkaException) as exc:
            log.warning("pool=%s pause not published (this worker pauses alone): %s", self.pool.name, exc)

    def _flow(self) -> None:
        """Partitions paused while the pool is, or while the records in hand fill
        2 x max_in_flight; resumed once it is not and no more than max_in_flight are."""
        in_hand = len(self.calls) + len(self.waiting)
        hold = self._paused() or in_hand >= 2 * self.spec.max_in_flight
        hold = hold or (bool(self._held) and in_hand > self.spec.max_in_flight)
        assignment = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        self._held &= assignment
        if hold:
            more = sorted(assignment - self._held)
            if more:
                self.consumer.pause([TopicPartition(t, p) for t, p in more])
                self._held |= set(more)
        elif self._held:
            self.consumer.resume([TopicPartition(t, p) for t, p in sorted(self._held)])
            self._held.clear()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """The waiting records of revoked partitions are their new owner's; calls out
        for them are answered all the same (the ledger commits none of them)."""
        super()._on_revoke(consumer, partitions)
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self.waiting = collections.deque(
            j for j in self.waiting if (j.record.topic(), j.record.partition()) not in revoked
        )
        self._held -= revoked

    # -- calls -----------------------------------------------------------------

    def _share(self) -> int:
        """This worker's share of the pool's rpm/tpm: one over the pool's members."""
        state = self.listener.board.state(self.pool.stage)
        members = int(state.get("members", -1)) if state is not None else -1
        return members if members > 0 else max(1, self.pool.replicas)

    def _send_ready(self) -> None:
        """Answers waiting requests past their deadline; sends the rest, oldest first,
        while calls are free, the pool is not paused and its pace allows."""
        now = now_ms()
        expired = [j for j in self.waiting if j.expired(now)]
        if expired:
            self.waiting = collections.deque(j for j in self.waiting if not j.expired(now))
            why = "deadline passed before inference (its pool was paused by its provider)"
            self.replies.send([(j.record, self._reply(j, "expired", error=why)) for j in expired])
        if self._paused():
            return
        while self.waiting and len(self.calls) < int(self.window):
            job = self.waiting[0]
            assert job.prompt is not None
            cost = estimate_tokens(job.prompt) + job.prompt.max_new_tokens
            if self.pacer.wait_s(cost, self._share(), time.monotonic()) > 0:
                return
            self.pacer.spend(cost)
            self.waiting.popleft()
            self._start(job)

    def _start(self, job: Job) -> None:
        assert job.prompt is not None
        call = next(self._call_ids)
        self.calls[call] = Call(job, time.monotonic())
        job.generation = job.generation or f"{self.instance}.{next(self._attempts)}"
        prompt = job.prompt
        body = chat_payload(self.spec, prompt.messages, prompt.max_new_tokens, prompt.temperature, job.streams)
        self.provider.call(call, body)
        self.remote_stats.calls += 1

    def _read_events(self, wait_s: float = 0.0) -> None:
        """What the provider said since: text, answers, 429s and failures."""
        done: list[tuple[Job, Generation, int]] = []
        failed: list[tuple[Job, str, str]] = []
        first = True
        while True:
            try:
                event: Event = (
                    self.provider.events.get(timeout=wait_s) if first and wait_s else self.provider.events.get_nowait()
                )
            except queue.Empty:
                break
            first = False
            call = self.calls.get(event.call)
            if call is None:  # answered already: cancelled, expired
                continue
            if isinstance(event, Delta):
                call.text += event.text
                call.deltas += 1
                continue
            del self.calls[event.call]
            if isinstance(event, Done):
                done.append((call.job, self._generation(call, event), int((time.monotonic() - call.started) * 1000)))
                self._no_wait_s = 0.0
                self.window = min(float(self.spec.max_in_flight), self.window + 1 / self.window)
                if event.exhausted_s:
                    self._pause(event.exhausted_s, "its limit is spent (x-ratelimit-remaining: 0)")
            elif isinstance(event, RateLimited):
                self.remote_stats.rate_limited += 1
                self._calls_ended["rate_limited"].inc()
                self._pause(self._wait_of(event), event.why)
                self.waiting.appendleft(call.job)  # sent again after the wait, first
            elif isinstance(event, Failed):
                failed.append((call.job, event.status, event.why))
        self._answer(done, failed)

    def _wait_of(self, event: RateLimited) -> float:
        if event.wait_s is not None:
            return event.wait_s
        least, most = NO_WAIT_BACKOFF_S
        self._no_wait_s = min(most, max(least, 2 * self._no_wait_s))
        return self._no_wait_s

    def _generation(self, call: Call, event: Done) -> Generation:
        """The answer with the provider's usage; estimated where it gave none."""
        assert call.job.prompt is not None
        tokens_in = event.tokens_in if event.tokens_in is not None else estimate_tokens(call.job.prompt)
        tokens_out = event.tokens_out
        if tokens_out is None:
            tokens_out = call.deltas or -(-len(event.text) // 4)
        self.remote_stats.prompt_tokens += tokens_in
        self.remote_stats.completion_tokens += tokens_out
        return Generation(event.text, tokens_in, tokens_out)

    def _answer(self, done: list[tuple[Job, Generation, int]], failed: list[tuple[Job, str, str]]) -> None:
        replies: list[tuple[object, Outgoing]] = []
        if done:
            self._finished([j for j, _, _ in done], [g for _, g, _ in done])
            replies += [(j.record, self._ok(j, g, inference_ms=ms)) for j, g, ms in done]
            self.remote_stats.ok += len(done)
            self._calls_ended["ok"].inc(len(done))
        for job, status, why in failed:
            self.remote_stats.errors += status == "error"
            self.remote_stats.invalid += status == "invalid"
            self._calls_ended[status].inc()
            replies.append((job.record, self._reply(job, status, error=why)))
        if replies:
            self.replies.send(replies)  # type: ignore[arg-type]

    def _drop_gone(self) -> None:
        """Calls whose caller cancelled (checked at most every CANCEL_CHECK_S, one MGET)
        or whose deadline passed are closed at the provider and answered `expired`;
        waiting requests whose caller cancelled are answered without a call."""
        now = time.monotonic()
        ended: list[tuple[Job, str]] = []
        for call_id, call in list(self.calls.items()):
            if call.job.expired(now_ms()):
                ended.append((self._close(call_id), f"deadline passed during inference after {call.deltas} tokens"))
        if now - self._cancel_checked_at >= CANCEL_CHECK_S and (self.calls or self.waiting):
            self._cancel_checked_at = now
            calls = list(self.calls.items())
            flags = self.store.cancelled([c.job for _, c in calls] + list(self.waiting))
            for (call_id, call), gone in zip(calls, flags, strict=False):
                if gone:
                    ended.append((self._close(call_id), f"cancelled by the caller after {call.deltas} tokens"))
            gone_waiting = {id(j) for j, gone in zip(self.waiting, flags[len(calls) :], strict=True) if gone}
            if gone_waiting:
                ended += [
                    (j, "cancelled by the caller before inference") for j in self.waiting if id(j) in gone_waiting
                ]
                self.waiting = collections.deque(j for j in self.waiting if id(j) not in gone_waiting)
        if ended:
            self.replies.send([(j.record, self._reply(j, "expired", error=why)) for j, why in ended])

    def _close(self, call_id: int) -> Job:
        """Closes a call at the provider; what it posts from now on is dropped."""
        self.provider.cancel(call_id)
        self.remote_stats.cancelled += 1
        self._calls_ended["expired"].inc()
        return self.calls.pop(call_id).job

    def _send_deltas(self) -> None:
        """Streamed requests' new text as chunks, at most every STREAM_INTERVAL_MS each
        (not tied to offsets: the reply that ends the stream is)."""
        now = time.monotonic()
        for call in self.calls.values():
            job = call.job
            if not job.streams or len(call.text) <= len(job.streamed):
                continue
            if now - job.chunked_at < self.settings.stream_interval_ms / 1000:
                continue
            self._send_chunk(job, call.text, call.deltas, now)

    # -- the way out, and stats --------------------------------------------------

    def _finish_in_flight(self, grace_s: float) -> None:
        """On SIGTERM: the calls out are answered for up to `grace_s`; what only waits is
        left uncommitted for the next owner of its partition, as are calls still out
        past the grace (closed at the provider)."""
        deadline = time.monotonic() + grace_s
        if self.calls:
            log.warning("stopping: finishing %d calls at the provider (up to %.0fs)", len(self.calls), grace_s)
        try:
            while self.calls and time.monotonic() < deadline:
                self._read_events(wait_s=FINISH_POLL_S)
                self._send_deltas()
                self.replies.poll()
        except Exception:
            log.exception("calls in flight not finished; they are left uncommitted")
        if self.calls:
            log.warning("stopping: %d calls left uncommitted after the grace", len(self.calls))

    def _publish_stats(self) -> None:
        self.outcomes.maybe_publish()
        if time.monotonic() - self._stats_at < self.settings.stats_interval_s:
            return
        self._stats_at = time.monotonic()
        self._paused()  # a pause in progress counts up to now
        if self._paused_since is not None:
            self.remote_stats.paused_ms += int((self._stats_at - self._paused_since) * 1000)
            self._paused_since = self._stats_at
        self.store.publish_stats(self.stats_key, self.remote_stats, "remote")
