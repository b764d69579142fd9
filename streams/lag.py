"""Where lag is computed: lag(stage) = sum over its partitions of (log end - group's committed offset).

The log end is taken from fetch responses, never from ListOffsets: the embedded
broker answers ListOffsets "latest" with the base offset of the last record batch
plus one, which undercounts whenever producers batch (docs/design.md). A group-less
consumer therefore reads each stage's topic at its tail; the end of a partition is
the larger of the fetch response's high watermark and the last offset seen plus one.
This is right on Apache Kafka too, and needs no live member in the stage's group.
Committed offsets come from OffsetFetch through a consumer that carries the stage's
group id but never joins it (`Consumer.committed`), also right on both brokers. (The
admin client's list_consumer_group_offsets crashed the process, SIGSEGV in
confluent-kafka 2.16.1, when Apache Kafka's group coordinator answered "load in
progress" right after a start.)

A stage may read more than one topic: with TENANT_TOPICS the processors also read
each tenant's own request topic (`<requests>.<tenant>`), so their lag counts those
too. The reader lists the broker's topics again every `TOPICS_EVERY_S`: a tenant
added while the monitor runs is counted from its first record (its backlog from the
log start, since nothing has been committed there). A partition is named by its
label (`Stage.label`): `3` on the stage's own topic, `acme/3` on tenant acme's.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streams.config import Settings
from streams.exceptions import TidegateError
from streams.faults import fault_armed
from streams.kafka import connection_config
from streams.lag_seconds import LagClock

log = logging.getLogger(__name__)

# a partition whose leader is being elected (a topic just created, a broker just gone)
LEADER_MOVING = frozenset(
    {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART}
)
PROCESSORS = "processors"
WORKERS = "workers"
TOPICS_EVERY_S = 5.0  # how often the broker's topics are listed again for stages with a pattern
ERROR_LOG_EVERY_S = 10.0  # a transient error of the tail is logged at most this often


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage is a consumer group reading its topic and, where `pattern` is set, every
    topic whose name matches it (the tenants' own request topics)."""

    name: str
    topic: str
    group: str
    pattern: str | None = None

    def reads(self, topic: str) -> bool:
        return topic == self.topic or (self.pattern is not None and re.match(self.pattern, topic) is not None)

    def label(self, topic: str, partition: int) -> str:
        """A partition's name in the stage's figures (Prometheus labels, health): `3` on
        the stage's own topic, `<suffix>/3` on another (`acme/3` on `<requests>.acme`)."""
        if topic == self.topic:
            return str(partition)
        suffix = topic[len(self.topic) + 1 :] if topic.startswith(f"{self.topic}.") else topic
        return f"{suffix}/{partition}"


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    log_end: int
    committed: int  # the log start where the group has not committed
    lag: int
    lag_seconds: float  # exact: the oldest unanswered record's age (streams/lag_seconds.py)
    lag_seconds_interpolated: float


@dataclass(frozen=True, slots=True)
class StageLag:
    stage: str
    lag: int
    log_end: int  # sum over partitions
    committed: int  # sum over partitions (log start where the group has not committed)
    partitions: dict[str, PartitionLag] = field(default_factory=dict)  # by label (Stage.label)

    @property
    def lag_seconds(self) -> float:
        return max((p.lag_seconds for p in self.partitions.values()), default=0.0)

    @property
    def lag_seconds_interpolated(self) -> float:
        return max((p.lag_seconds_interpolated for p in self.partitions.values()), default=0.0)


def pipeline_stages(settings: Settings) -> list[Stage]:
    """The processors (with TENANT_TOPICS, the tenants' request topics too) and the workers."""
    tenants = settings.topics.tenant_requests_pattern if settings.tenant_topics else None
    return [
        Stage(PROCESSORS, settings.topics.requests, settings.processor_group, tenants),
        Stage(WORKERS, settings.topics.contexts, settings.worker_group),
    ]


class LagReader:
    """Tracks log ends by tailing the stages' topics; reads committed offsets on demand.

    A transient error of the tail (a broker restarting, a leader moving, a tenant topic
    just deleted) is logged and the tail goes on: librdkafka reconnects by itself.
    """

    def __init__(self, settings: Settings, stages: list[Stage]) -> None:
        self.stages = stages
        # one per stage: OffsetFetch for the stage's group, never subscribed, never committing
        self._offsets = {
            stage.name: Consumer(
                {
                    **connection_config(settings),
                    "group.id": stage.group,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                }
            )
            for stage in stages
        }
        self._tail = Consumer(
            {
                **connection_config(settings),
                "group.id": f"tidegate-lag-{uuid.uuid4().hex}",  # never joined, never committed
                "enable.auto.commit": False,
                "fetch.wait.max.ms": settings.control_fetch_wait_ms,
                "queued.max.messages.kbytes": 8192,
            }
        )
        self._partitions: dict[str, list[TopicPartition]] = {s.name: [] for s in stages}  # by stage
        self._end: dict[tuple[str, int], int] = {}
        self._start: dict[tuple[str, int], int] = {}
        self._listed_at = 0.0
        self._error_logged_at = 0.0
        self.clock = LagClock()
        try:
            listed = self._tail.list_topics(timeout=10).topics
            for stage in stages:
                meta = listed.get(stage.topic)
                if meta is None or meta.error is not None or not meta.partitions:
                    raise TidegateError(f"topic {stage.topic!r} not found: create the topics first")
            self._track(listed, watermark_timeout_s=15.0, strict=True)
        except BaseException:  # a caller that tries again must not leak these consumers
            self.close()
            raise
        self._listed_at = time.monotonic()

    def _track(self, listed: dict, watermark_timeout_s: float, strict: bool = False) -> None:
        """Follows the stages' topics as listed: tails the partitions not tailed yet
        (from their log end, their backlog counted from the log start), drops those of
        topics gone. A partition whose leader is not known yet waits for the next list."""
        added = []
        for stage in self.stages:
            wanted = {
                (name, p)
                for name, meta in listed.items()
                if stage.reads(name) and meta.error is None
                for p in meta.partitions
            }
            tracked = self._partitions[stage.name]
            # a stage's own topic is never dropped (a list that missed it is a broker's hiccup)
            kept = [tp for tp in tracked if (tp.topic, tp.partition) in wanted or tp.topic == stage.topic]
            gone = [tp for tp in tracked if (tp.topic, tp.partition) not in wanted and tp.topic != stage.topic]
            if gone:
                self._tail.incremental_unassign(gone)
            known = {(tp.topic, tp.partition) for tp in kept}
            for name, p in sorted(wanted - known):
                tp = TopicPartition(name, p)
                try:
                    low, high = self._watermarks(tp, watermark_timeout_s)
                except KafkaException as exc:
                    if strict and name == stage.topic:  # at the start: as before, the stage's own topic must answer
                        raise
                    log.info("partition %s/%d not tailed yet: %s", name, p, exc)
                    continue
                # ListOffsets may answer early (never late): start there and read up to the true end
                self._end[(name, p)] = high
                self._start[(name, p)] = max(0, low)
                kept.append(tp)
                added.append(TopicPartition(name, p, high))
            self._partitions[stage.name] = sorted(
                kept, key=lambda tp: (tp.topic != stage.topic, tp.topic, tp.partition)
            )
        if added:
            self._tail.incremental_assign(added)

    def _relist(self) -> None:
        """Lists the topics again (every TOPICS_EVERY_S, for stages with a pattern)."""
        if not any(s.pattern for s in self.stages) or time.monotonic() - self._listed_at < TOPICS_EVERY_S:
            return
        self._listed_at = time.monotonic()
        try:
            listed = self._tail.list_topics(timeout=2).topics
        except KafkaException as exc:  # the broker between lives: the topics known so far stand
            self._transient(f"topics not listed: {exc}")
            return
        self._track(listed, watermark_timeout_s=2.0)

    def _transient(self, what: str) -> None:
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_EVERY_S:
            self._error_logged_at = now
            log.warning("lag tail: %s (going on)", what)

    def _watermarks(self, tp: TopicPartition, timeout_s: float = 15.0) -> tuple[int, int]:
        """A partition's offsets; a topic created a moment ago may not have its leader
        yet ("not leader for partition"): asked again until `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._tail.get_watermark_offsets(tp, timeout=min(10.0, timeout_s), cached=False)
            except KafkaException as exc:
                if exc.args[0].code() not in LEADER_MOVING or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def poll(self, timeout_s: float) -> None:
        """Reads whatever arrived at the tails and updates the log ends. Raises only
        on a fatal error of the consumer; transient ones are logged."""
        self._relist()
        messages = self._tail.consume(10_000, timeout_s)
        errors = [m.error() for m in messages if m.error() is not None]
        if fault_armed("lag-tail-error"):  # tests/test_monitor_faults.py
            errors.append(KafkaError(KafkaError._TRANSPORT, "injected by TIDEGATE_FAULTS", fatal=False))
        for error in errors:
            if error.fatal():
                raise TidegateError(f"lag tail: {error}")
            if error.code() != KafkaError._PARTITION_EOF:
                self._transient(str(error))
        for message in messages:
            if message.error() is not None:
                continue
            key = (message.topic(), message.partition())
            if key not in self._end:  # a partition dropped since it was fetched
                continue
            self._end[key] = max(self._end[key], message.offset() + 1)
            self.clock.record(key, message.offset(), message.timestamp()[1])
        now = time.time()
        for tps in self._partitions.values():
            for tp in tps:
                _, high = self._tail.get_watermark_offsets(tp, cached=True)
                key = (tp.topic, tp.partition)
                if high is not None and high >= 0:
                    self._end[key] = max(self._end[key], high)
                self.clock.end(key, self._end[key], now)

    def topics(self, stage: Stage) -> list[str]:
        """The topics the stage's lag counts now, its own first."""
        return list(dict.fromkeys(tp.topic for tp in self._partitions[stage.name]))

    def committed(self, stage: Stage, timeout_s: float = 5.0) -> dict[str, int]:
        """The group's committed offset per partition label (Stage.label); -1 where it
        has none. Raises KafkaException while the group's coordinator is unavailable."""
        found = self._offsets[stage.name].committed(self._partitions[stage.name], timeout=timeout_s)
        return {stage.label(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else -1 for tp in found}

    def partition_count(self, stage: Stage) -> int:
        return len(self._partitions[stage.name])

    def lag(self, stage: Stage) -> StageLag:
        committed = self.committed(stage)
        now = time.time()
        end_sum = done_sum = lag = 0
        partitions = {}
        for tp in self._partitions[stage.name]:
            key = (tp.topic, tp.partition)
            label = stage.label(tp.topic, tp.partition)
            end = self._end[key]
            done = committed.get(label, -1)
            if done < 0:  # nothing committed yet: the group starts from the log start
                done = self._start[key]
            exact, interpolated = self.clock.age(key, done, end, now)
            partitions[label] = PartitionLag(tp.topic, tp.partition, end, done, max(0, end - done), exact, interpolated)
            end_sum += end
            done_sum += done
            lag += max(0, end - done)
        return StageLag(stage.name, lag, end_sum, done_sum, partitions)

    def close(self) -> None:
        self._tail.close()
        for consumer in self._offsets.values():
            consumer.close()
