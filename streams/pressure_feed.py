"""Keeps a PressureBoard current from the pressure topic, in a background thread: the
stages' PressureStates, and the pools' PoolPauses (streams/pauses.py) in `board.pauses`.

Assigned (no group join) near the topic's end: Tansu never compacts (Kafka does),
so the topic is not replayed from the start; the monitor republishes every stage at
least once a second, so a fresh reader is current within a second.

Starting is tried again with backoff (one log line per attempt, for up to
`START_GIVE_UP_S`): a pressure topic created a moment ago has no partition leader
yet (NOT_LEADER_FOR_PARTITION, LEADER_NOT_AVAILABLE) and a broker may be restarting;
the processors, the gateway and the autoscaler all start one, and died on it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas import SerializationError, get_codec
from streams.config import Settings
from streams.faults import fault_armed
from streams.kafka import connection_config, consume_ready
from streams.pressure import PressureBoard

log = logging.getLogger(__name__)
REPLAY = 64  # records before the end to read at start: recent states of every stage
START_GIVE_UP_S = 60.0  # how long a start is tried again before its error is raised
START_BACKOFF_MAX_S = 5.0


class PressureListener:
    def __init__(self, settings: Settings, board: PressureBoard | None = None) -> None:
        self.settings = settings
        self.board = board or PressureBoard(settings.pressure_stale_s, settings.warn_ratio)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None  # connects in start(), not here

    def start(self, give_up_s: float = START_GIVE_UP_S, stopping: threading.Event | None = None) -> None:
        """Assigns the pressure topic's partitions near their end and starts reading.
        A Kafka error is tried again with backoff (0.4 s, doubling, at most 5 s), one
        log line per attempt, until `give_up_s` has passed (then it is raised) or
        `stopping` is set (then it returns, not started: every stage counts as stale)."""
        give_up_at = time.monotonic() + give_up_s
        waiter = stopping or threading.Event()
        attempt = 0
        while True:
            try:
                self._assign()
                break
            except KafkaException as exc:
                attempt += 1
                self._close_consumer()
                backoff = min(START_BACKOFF_MAX_S, 0.2 * 2**attempt)
                if time.monotonic() + backoff > give_up_at:
                    raise
                log.warning("attempt=%d pressure topic not read yet, again in %.1fs: %s", attempt, backoff, exc)
                if waiter.wait(backoff):
                    return
        self._thread = threading.Thread(target=self._run, name="tidegate-pressure", daemon=True)
        self._thread.start()

    def _assign(self) -> None:
        self._consumer = Consumer(
            {
                **connection_config(self.settings),
                "group.id": f"tidegate-pressure-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": self.settings.control_fetch_wait_ms,
            }
        )
        topic = self.settings.topics.pressure
        meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        partitions = sorted(meta.partitions) if meta is not None and meta.error is None else []
        assignment = []
        for p in partitions:
            if fault_armed("pressure.no_leader"):  # a topic created a moment ago (tests/test_pressure_start.py)
                raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION, "injected by TIDEGATE_FAULTS"))
            low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            assignment.append(TopicPartition(topic, p, max(low, high - REPLAY)))
        if not assignment:
            log.warning("pressure topic %s not found: every stage counts as stale", topic)
        self._consumer.assign(assignment)

    def _close_consumer(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _run(self) -> None:
        assert self._consumer is not None
        codec = get_codec()
        while not self._stop.is_set():
            for message in consume_ready(self._consumer, 100, 0.1):
                if message.error() is not None:
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("pressure listener: %s", message.error())
                    continue
                try:
                    name, record = codec.decode(message.value())
                except SerializationError as exc:
                    log.warning("undecodable pressure state skipped: %s", exc)
                    continue
                if name == "PressureState":
                    self.board.publish(record)
                elif name == "PoolPause":  # a pool's provider asked it to wait (streams/pauses.py)
                    self.board.pauses.note(record)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._close_consumer()
