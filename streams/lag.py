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
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streams.config import Settings
from streams.exceptions import TidegateError
from streams.kafka import connection_config
from streams.lag_seconds import LagClock

# a partition whose leader is being elected (a topic just created, a broker just gone)
LEADER_MOVING = frozenset(
    {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART}
)
PROCESSORS = "processors"
WORKERS = "workers"


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage is a consumer group reading one topic."""

    name: str
    topic: str
    group: str


@dataclass(frozen=True, slots=True)
class PartitionLag:
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
    partitions: dict[int, PartitionLag] = field(default_factory=dict)

    @property
    def lag_seconds(self) -> float:
        return max((p.lag_seconds for p in self.partitions.values()), default=0.0)

    @property
    def lag_seconds_interpolated(self) -> float:
        return max((p.lag_seconds_interpolated for p in self.partitions.values()), default=0.0)


def pipeline_stages(settings: Settings) -> list[Stage]:
    return [
        Stage(PROCESSORS, settings.topics.requests, settings.processor_group),
        Stage(WORKERS, settings.topics.contexts, settings.worker_group),
    ]


class LagReader:
    """Tracks log ends by tailing the stages' topics; reads committed offsets on demand."""

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
        self._partitions: dict[str, list[TopicPartition]] = {}
        self._end: dict[tuple[str, int], int] = {}
        self._start: dict[tuple[str, int], int] = {}
        self.clock = LagClock()
        assignment = []
        for stage in stages:
            meta = self._tail.list_topics(stage.topic, timeout=10).topics.get(stage.topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise TidegateError(f"topic {stage.topic!r} not found: create the topics first")
            tps = [TopicPartition(stage.topic, p) for p in sorted(meta.partitions)]
            self._partitions[stage.topic] = tps
            for tp in tps:
                low, high = self._watermarks(tp)
                # ListOffsets may answer early (never late): start there and read up to the true end
                self._end[(tp.topic, tp.partition)] = high
                self._start[(tp.topic, tp.partition)] = max(0, low)
                assignment.append(TopicPartition(tp.topic, tp.partition, high))
        self._tail.assign(assignment)

    def _watermarks(self, tp: TopicPartition, timeout_s: float = 15.0) -> tuple[int, int]:
        """A partition's offsets; a topic created a moment ago may not have its leader
        yet ("not leader for partition"): asked again until `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._tail.get_watermark_offsets(tp, timeout=10, cached=False)
            except KafkaException as exc:
                if exc.args[0].code() not in LEADER_MOVING or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def poll(self, timeout_s: float) -> None:
        """Reads whatever arrived at the tails and updates the log ends."""
        for message in self._tail.consume(10_000, timeout_s):
            if message.error() is not None:
                if message.error().code() != KafkaError._PARTITION_EOF:
                    raise TidegateError(f"lag tail: {message.error()}")
                continue
            key = (message.topic(), message.partition())
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

    def committed(self, stage: Stage, timeout_s: float = 5.0) -> dict[int, int]:
        """The group's committed offset per partition; -1 where it has none.
        Raises KafkaException while the group's coordinator is unavailable."""
        found = self._offsets[stage.name].committed(self._partitions[stage.topic], timeout=timeout_s)
        return {tp.partition: tp.offset if tp.offset >= 0 else -1 for tp in found}

    def partition_count(self, stage: Stage) -> int:
        return len(self._partitions[stage.topic])

    def lag(self, stage: Stage) -> StageLag:
        committed = self.committed(stage)
        now = time.time()
        end_sum = done_sum = lag = 0
        partitions = {}
        for tp in self._partitions[stage.topic]:
            key = (tp.topic, tp.partition)
            end = self._end[key]
            done = committed.get(tp.partition, -1)
            if done < 0:  # nothing committed yet: the group starts from the log start
                done = self._start[key]
            exact, interpolated = self.clock.age(key, done, end, now)
            partitions[tp.partition] = PartitionLag(end, done, max(0, end - done), exact, interpolated)
            end_sum += end
            done_sum += done
            lag += max(0, end - done)
        return StageLag(stage.name, lag, end_sum, done_sum, partitions)

    def close(self) -> None:
        self._tail.close()
        for consumer in self._offsets.values():
            consumer.close()
