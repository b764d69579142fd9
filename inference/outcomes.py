"""A worker's outcomes: its counts of `ok`, `error` and `expired` replies, to Kafka.

Once per STATS_INTERVAL_S, when it answered anything since the last record, a worker
publishes a WorkerOutcomes record to `<prefix>outcomes` (key: its pool). The lag
monitor reads the topic from its end and judges each pool's circuit breaker by them
(ops/breaker.py): the breaker's state is shared through Kafka, so every worker's
errors count, whichever process routes to the pool.

Reporting never holds or fails the consume loop: the record goes through a producer
of its own (not the replies' idempotent one, whose fatal error would stop the
worker), produced without waiting; a record the broker refuses, or one that cannot
even be queued, is logged and its counts are added to the next interval's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas import AVRO, SerializationError, content_type_header, get_codec
from streams.config import Settings
from streams.kafka import connection_config
from streams.outgoing import now_ms

log = logging.getLogger(__name__)

COUNTED = ("ok", "error", "expired")  # reply statuses a pool's health is judged by
LOG_EVERY_S = 10.0  # a failing report is logged at most this often
CLOSE_FLUSH_S = 1.0  # the last report's wait on the way out


def outcomes_producer(settings: Settings) -> Producer:
    """Small, quick and never fatal: one acknowledgement, a record given up within 10 s
    (the next interval's carries its counts)."""
    return Producer(
        {
            **connection_config(settings),
            "acks": 1,
            "linger.ms": 50,
            "message.timeout.ms": 10_000,
            "queue.buffering.max.messages": 1000,
        }
    )


@dataclass(slots=True)
class Counts:
    ok: int = 0
    errors: int = 0
    expired: int = 0

    def __bool__(self) -> bool:
        return bool(self.ok or self.errors or self.expired)

    def add(self, other: Counts) -> None:
        self.ok += other.ok
        self.errors += other.errors
        self.expired += other.expired


class OutcomeReporter:
    """Counts a worker's replies by status and publishes them every `interval_s`.

    Only with a fleet file: without one no breaker reads them (ops/pools.py), and a
    deployment whose topics predate the outcomes topic would be warned at every
    interval about a topic it never needed (nothing changes without a fleet)."""

    def __init__(self, settings: Settings, pool: str, member: str, producer: Producer | None = None) -> None:
        self.topic = settings.topics.outcomes
        self.pool = pool
        self.member = member
        self.interval_s = settings.stats_interval_s
        self.enabled = producer is not None or settings.fleet_file is not None
        self.producer = producer if producer is not None else (outcomes_producer(settings) if self.enabled else None)
        self.counts = Counts()
        self._since = time.monotonic()
        self._since_ms = now_ms()
        self._logged_at = 0.0

    def count(self, status: str) -> None:
        """One reply sent with `status`; statuses other than COUNTED (`invalid`, a
        dead letter) are the caller's doing, not the pool's, and are not counted."""
        if status == "ok":
            self.counts.ok += 1
        elif status == "error":
            self.counts.errors += 1
        elif status == "expired":
            self.counts.expired += 1

    def maybe_publish(self, now: float | None = None) -> None:
        """Publishes the counts when `interval_s` has passed and there are any; serves
        the delivery reports that arrived. Never raises, never waits."""
        if self.producer is None:
            return
        now = time.monotonic() if now is None else now
        self._serve()
        if now - self._since < self.interval_s or not self.counts:
            return
        counts, self.counts = self.counts, Counts()
        started_ms, self._since_ms, self._since = self._since_ms, now_ms(), now
        record = {
            "pool": self.pool,
            "member": self.member,
            "ok": counts.ok,
            "errors": counts.errors,
            "expired": counts.expired,
            "interval_ms": max(0, self._since_ms - started_ms),
            "updated_ms": self._since_ms,
        }

        def on_delivery(err: KafkaError | None, _msg: Message | None) -> None:
            if err is not None:
                self._failed(counts, err.str())

        try:
            value = get_codec().encode("WorkerOutcomes", record)
            self.producer.produce(
                self.topic,
                value,
                self.pool.encode(),
                headers=[content_type_header(AVRO)],
                on_delivery=on_delivery,
            )
        except (BufferError, KafkaException, SerializationError) as exc:
            self._failed(counts, str(exc))

    def close(self) -> None:
        """Publishes what is counted (the interval not over yet) and waits briefly."""
        if self.producer is None:
            return
        try:
            self.maybe_publish(now=self._since + self.interval_s)
            self.producer.flush(CLOSE_FLUSH_S)
        except Exception as exc:  # on the way out: nothing left to protect but the exit
            log.info("last outcomes not published: %s", exc)

    def _serve(self) -> None:
        try:
            self.producer.poll(0)
        except KafkaException as exc:
            self._log(f"outcomes producer: {exc}")

    def _failed(self, counts: Counts, why: str) -> None:
        self.counts.add(counts)  # the next interval's record carries them
        self._log(f"outcomes not published (kept for the next interval): {why}")

    def _log(self, message: str) -> None:
        if time.monotonic() - self._logged_at >= LOG_EVERY_S:
            self._logged_at = time.monotonic()
            log.warning(message)
