"""The lag monitor's tail of the workers' outcomes (`<prefix>outcomes`, WorkerOutcomes).

A group-less consumer, assigned from the topic's end like the monitor's other tails:
the breakers judge what the workers answer from now on, not an hour of history (a
restarted monitor resumes each circuit from its last published state instead). A
topic not there yet (a deployment whose topics predate it: `tidegate dev up` or
create_topics makes it) is looked for again every LIST_AGAIN_S, one log line the
first time; meanwhile the breakers judge by the groups alone (members, Burrow's
STALL and STOP). A record that does not decode, or one no worker sends (a negative
count), is skipped, logged at most every LOG_EVERY_S: the outcomes are advisory, and
one bad record must not blind a pool.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from schemas import SerializationError, get_codec
from streams.config import Settings
from streams.kafka import connection_config

log = logging.getLogger(__name__)

LIST_AGAIN_S = 10.0
LOG_EVERY_S = 10.0


class OutcomesTail:
    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topics.outcomes
        self._consumer = Consumer(
            {
                **connection_config(settings),
                "group.id": f"tidegate-outcomes-{uuid.uuid4().hex}",  # never joined, never committed
                "enable.auto.commit": False,
                "fetch.wait.max.ms": settings.control_fetch_wait_ms,
            }
        )
        self._assigned = False
        self._listed_at = -LIST_AGAIN_S
        self._missing_logged = False
        self._logged_at = 0.0
        self._codec = get_codec()

    def _assign(self) -> None:
        now = time.monotonic()
        if now - self._listed_at < LIST_AGAIN_S:
            return
        self._listed_at = now
        try:
            meta = self._consumer.list_topics(self.topic, timeout=2).topics.get(self.topic)
        except KafkaException as exc:
            self._log(f"outcomes topic not listed: {exc}")
            return
        if meta is None or meta.error is not None or not meta.partitions:
            if not self._missing_logged:
                self._missing_logged = True
                log.warning("topic %s not found: circuits judge by the groups alone until it exists", self.topic)
            return
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_END) for p in sorted(meta.partitions)])
        self._assigned = True
        log.info("tailing %s (%d partitions) from its end", self.topic, len(meta.partitions))

    def poll(self) -> list[dict[str, Any]]:
        """The WorkerOutcomes records that arrived since the last poll; never waits."""
        if not self._assigned:
            self._assign()
            if not self._assigned:
                return []
        found = []
        for message in self._consumer.consume(1000, 0):
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    self._log(f"outcomes tail: {error}")
                continue
            try:
                found.append(self._outcomes(message.value()))
            except SerializationError as exc:
                self._log(f"outcomes record at {message.partition()}/{message.offset()} skipped: {exc}")
        return found

    def _outcomes(self, value: bytes | None) -> dict[str, Any]:
        """The WorkerOutcomes record, or SerializationError: one that does not decode, or
        that no worker sends (a negative count: in a half-open circuit's tally it kept
        the circuit from ever closing; in a closed one's window it hid the errors)."""
        record = self._codec.decode(value, "WorkerOutcomes")[1]
        if min(record["ok"], record["errors"], record["expired"]) < 0:
            raise SerializationError(f"negative counts from pool {record['pool'][:64]!r}")
        return record

    def _log(self, message: str) -> None:
        if time.monotonic() - self._logged_at >= LOG_EVERY_S:
            self._logged_at = time.monotonic()
            log.warning(message)

    def close(self) -> None:
        self._consumer.close()
