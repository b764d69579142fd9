"""Keeps a PressureBoard current from the pressure topic, in a background thread.

Assigned (no group join) near the topic's end: Tansu never compacts (Kafka does),
so the topic is not replayed from the start; the monitor republishes every stage at
least once a second, so a fresh reader is current within a second.
"""

from __future__ import annotations

import logging
import threading
import uuid

from confluent_kafka import Consumer, KafkaError, TopicPartition

from schemas import SerializationError, get_codec
from streams.config import Settings
from streams.kafka import connection_config, consume_ready
from streams.pressure import PressureBoard

log = logging.getLogger(__name__)
REPLAY = 64  # records before the end to read at start: recent states of every stage


class PressureListener:
    def __init__(self, settings: Settings, board: PressureBoard | None = None) -> None:
        self.settings = settings
        self.board = board or PressureBoard(settings.pressure_stale_s, settings.warn_ratio)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None  # connects in start(), not here

    def start(self) -> None:
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
            low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            assignment.append(TopicPartition(topic, p, max(low, high - REPLAY)))
        if not assignment:
            log.warning("pressure topic %s not found: every stage counts as stale", topic)
        self._consumer.assign(assignment)
        self._thread = threading.Thread(target=self._run, name="tidegate-pressure", daemon=True)
        self._thread.start()

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
                    self.board.publish(codec.decode(message.value(), "PressureState")[1])
                except SerializationError as exc:
                    log.warning("undecodable pressure state skipped: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._consumer is not None:
            self._consumer.close()
