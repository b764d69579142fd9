"""The lag reader's listings of the broker's topics, on a thread of their own.

A stage that reads a pattern (the tenants' request topics) needs the topics listed
again every few seconds, and a new partition's start and end offsets read before it
is tailed. Both used to run on the lag monitor's loop: a full listing grows with
every client's reply topic (they are never deleted) and failed past its 2 s, after
which tenant topics were silently never listed again; a new tenant's partitions
without a leader yet took up to 2 s each; and for that long no stage's state was
published, so every reader saw them stale. Here a thread lists (with a longer
timeout, one log line per failed listing) and reads the new partitions' offsets
within a budget; the reader applies the latest result at its next poll, and the
partitions whose offsets were not read in time wait for the next listing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streams.config import Settings
from streams.faults import fault_armed
from streams.kafka import connection_config

log = logging.getLogger(__name__)

Partition = tuple[str, int]
# a partition whose leader is being elected (a topic just created, a broker just gone)
LEADER_MOVING = frozenset(
    {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART}
)
LIST_TIMEOUT_S = 15.0  # off the loop: a long listing (many reply topics) may take its time
OFFSETS_TIMEOUT_S = 2.0  # per new partition; one without a leader waits for the next listing
OFFSETS_BUDGET_S = 10.0  # per listing, for all its new partitions together
INJECTED_STALL_S = 6.0  # the stall of the `lag-list-slow` and `lag-watermark-slow` fault points


@dataclass(frozen=True, slots=True)
class Listing:
    """The partitions of the wanted topics as listed, and the (log start, log end)
    of those new to the reader whose offsets could be read."""

    partitions: frozenset[Partition]
    offsets: dict[Partition, tuple[int, int]]


def watermarks(consumer: Consumer, tp: TopicPartition, timeout_s: float) -> tuple[int, int]:
    """A partition's (log start, log end) by ListOffsets; a topic created a moment ago
    may not have its leader yet ("not leader for partition"): asked again until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=min(10.0, timeout_s), cached=False)
        except KafkaException as exc:
            if exc.args[0].code() not in LEADER_MOVING or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def wanted_partitions(listed: dict, wanted: Callable[[str], bool]) -> frozenset[Partition]:
    return frozenset(
        (name, p) for name, meta in listed.items() if wanted(name) and meta.error is None for p in meta.partitions
    )


class TopicLister:
    """Lists the topics `wanted` accepts every `every_s` on its own thread, with its own
    consumer (never joined); `take` hands the latest listing over, once."""

    def __init__(self, settings: Settings, wanted: Callable[[str], bool], every_s: float) -> None:
        self._wanted = wanted
        self._every_s = every_s
        self._consumer = Consumer({**connection_config(settings), "group.id": f"tidegate-lag-list-{uuid.uuid4().hex}"})
        self._lock = threading.Lock()
        self._known: frozenset[Partition] = frozenset()  # what the reader tails, as of its last take
        self._latest: Listing | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-topic-lister", daemon=True)
        self._thread.start()

    def take(self, known: frozenset[Partition]) -> Listing | None:
        """The listing made since the last take, if any; `known` (the partitions the
        reader tails now) saves the next listing reading their offsets again."""
        with self._lock:
            latest, self._latest = self._latest, None
            self._known = known
        return latest

    def close(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout_s)  # the thread closes its consumer as it leaves

    def _run(self) -> None:
        try:
            while not self._stopping.wait(self._every_s):
                listing = self._list()
                if listing is not None:
                    with self._lock:
                        self._latest = listing
        finally:
            self._consumer.close()

    def _stall(self, point: str) -> None:
        if fault_armed(point):  # tests/test_monitor_listing.py: a slow broker
            log.warning("%s stalled by TIDEGATE_FAULTS for %.0f s", point, INJECTED_STALL_S)
            self._stopping.wait(INJECTED_STALL_S)

    def _list(self) -> Listing | None:
        self._stall("lag-list-slow")
        try:
            listed = self._consumer.list_topics(timeout=LIST_TIMEOUT_S).topics
        except KafkaException as exc:  # the topics known so far stand until a listing succeeds
            log.warning("topics not listed within %.0f s (the last listing stands): %s", LIST_TIMEOUT_S, exc)
            return None
        partitions = wanted_partitions(listed, self._wanted)
        with self._lock:
            known = self._known
        offsets = {}
        deadline = time.monotonic() + OFFSETS_BUDGET_S
        for name, p in sorted(partitions - known):
            if self._stopping.is_set() or time.monotonic() > deadline:
                break  # the rest wait for the next listing
            self._stall("lag-watermark-slow")
            try:
                offsets[(name, p)] = watermarks(self._consumer, TopicPartition(name, p), OFFSETS_TIMEOUT_S)
            except KafkaException as exc:
                log.info("partition %s/%d not tailed yet: %s", name, p, exc)
        return Listing(partitions, offsets)
