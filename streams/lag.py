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
too. The reader lists the broker's topics again every `TOPICS_EVERY_S`, beside its
caller's loop (streams/lag_topics.py): a tenant added while the monitor runs is
counted from its first record (its backlog from the log start, since nothing has
been committed there). A partition is named by its label (`Stage.label`): `3` on the
stage's own topic, `acme/3` on tenant acme's. A partition dropped (its topic deleted,
or missing from a listing) leaves no state behind.

The set of partitions changes, so what a stage committed and what arrived are
measured as sums of per-partition steps over the partitions present in both of two
samples (`Progress`), never as differences of totals: a deleted tenant topic took its
committed offsets out of the total, and the drain rate read from it fell to 0 (the
seconds-cap to its floor, `queue_full` for every tenant); a partition (re-)added
made the total jump up, a spurious rate or arrival spike.
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
from streams.fleet import Fleet, load_fleet
from streams.kafka import connection_config
from streams.lag_seconds import LagClock
from streams.lag_topics import OFFSETS_TIMEOUT_S, Listing, Partition, TopicLister, wanted_partitions, watermarks

log = logging.getLogger(__name__)

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
    # running totals of per-partition steps (Progress): what rates are measured from
    arrived: int = 0
    done: int = 0

    @property
    def lag_seconds(self) -> float:
        return max((p.lag_seconds for p in self.partitions.values()), default=0.0)

    @property
    def lag_seconds_interpolated(self) -> float:
        return max((p.lag_seconds_interpolated for p in self.partitions.values()), default=0.0)


def pipeline_stages(settings: Settings, fleet: Fleet | None = None) -> list[Stage]:
    """The processors (with TENANT_TOPICS, the tenants' request topics too), then the
    workers of each pool of the fleet (`fleet`, else FLEET_FILE's): a stage per pool, its
    contexts topic in its group. Without a fleet file: the one `workers` stage.

    :raises FleetError: the fleet file is wrong (streams/fleet.py)."""
    tenants = settings.topics.tenant_requests_pattern if settings.tenant_topics else None
    pools = (fleet or load_fleet(settings)).pools.values()
    return [
        Stage(PROCESSORS, settings.topics.requests, settings.processor_group, tenants),
        *(Stage(pool.stage, pool.contexts_topic, pool.group) for pool in pools),
    ]


class Progress:
    """Running totals of what arrived (log-end steps) and what was done (committed
    steps) on a changing set of partitions: each sample adds, for every partition
    present in the previous sample too, its step since then. A partition that left
    (a tenant's topic deleted) or came (back) adds nothing, so a rate taken from the
    totals' differences is the rate of the partitions that stayed."""

    def __init__(self) -> None:
        self.arrived = 0
        self.done = 0
        self._last: dict[Partition, tuple[int, int]] = {}  # per partition: (log end, committed)

    def update(self, samples: dict[Partition, tuple[int, int]]) -> tuple[int, int]:
        """Takes (log end, committed) per partition; returns (arrived, done) so far."""
        for key, (end, done) in samples.items():
            last = self._last.get(key)
            if last is not None:
                self.arrived += end - last[0]
                self.done += done - last[1]
        self._last = dict(samples)
        return self.arrived, self.done


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
        self._end: dict[Partition, int] = {}
        self._start: dict[Partition, int] = {}
        # the last committed offset seen per partition: held when OffsetFetch stops
        # answering one (a tenant's topic deleted takes its group offsets with it; until
        # a listing drops the partition, falling back to the log start read its whole
        # log as lag, and its committed offset as undone work)
        self._committed: dict[Partition, int] = {}
        self._progress = {s.name: Progress() for s in stages}
        self._error_logged_at = 0.0
        self.clock = LagClock()
        self._lister: TopicLister | None = None
        try:
            self._track(self._first_listing())
            if any(s.pattern for s in stages):
                self._lister = TopicLister(settings, self._reads, TOPICS_EVERY_S)
        except BaseException:  # a caller that tries again must not leak these consumers
            self.close()
            raise

    def _reads(self, topic: str) -> bool:
        return any(stage.reads(topic) for stage in self.stages)

    def _first_listing(self) -> Listing:
        """The stages' topics and their partitions' offsets, read here at the start: the
        stages' own topics must answer (within 15 s for a leader), a tenant's partition
        that does not waits for the next listing."""
        listed = self._tail.list_topics(timeout=10).topics
        own = {stage.topic for stage in self.stages}
        for topic in own:
            meta = listed.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise TidegateError(f"topic {topic!r} not found: create the topics first")
        partitions = wanted_partitions(listed, self._reads)
        offsets = {}
        for name, p in sorted(partitions):
            try:
                offsets[(name, p)] = watermarks(
                    self._tail, TopicPartition(name, p), 15.0 if name in own else OFFSETS_TIMEOUT_S
                )
            except KafkaException as exc:
                if name in own:
                    raise
                log.info("partition %s/%d not tailed yet: %s", name, p, exc)
        return Listing(partitions, offsets)

    def _track(self, listing: Listing) -> None:
        """Follows the stages' topics as listed: tails the partitions not tailed yet
        whose offsets the listing read (from their log end, their backlog counted from
        the log start), drops those of topics gone. A partition whose leader is not
        known yet waits for the next listing."""
        added, gone = [], []
        for stage in self.stages:
            tracked = self._partitions[stage.name]
            # a stage's own topic is never dropped (a list that missed it is a broker's hiccup)
            kept = [tp for tp in tracked if (tp.topic, tp.partition) in listing.partitions or tp.topic == stage.topic]
            kept_keys = {(tp.topic, tp.partition) for tp in kept}
            gone += [tp for tp in tracked if (tp.topic, tp.partition) not in kept_keys]
            for name, p in sorted(listing.partitions - kept_keys):
                if not stage.reads(name) or (name, p) not in listing.offsets:
                    continue
                low, high = listing.offsets[(name, p)]
                # ListOffsets may answer early (never late): start there and read up to the true end
                self._end[(name, p)] = high
                self._start[(name, p)] = max(0, low)
                kept.append(TopicPartition(name, p))
                added.append(TopicPartition(name, p, high))
            self._partitions[stage.name] = sorted(
                kept, key=lambda tp: (tp.topic != stage.topic, tp.topic, tp.partition)
            )
        if gone:
            self._tail.incremental_unassign(gone)
            for tp in gone:
                self._drop((tp.topic, tp.partition))
        if added:
            self._tail.incremental_assign(added)

    def _drop(self, key: Partition) -> None:
        """Forgets a partition no stage reads any more (Progress forgets it at its next sample)."""
        self._end.pop(key, None)
        self._start.pop(key, None)
        self._committed.pop(key, None)
        self.clock.forget(key)

    def _tailed(self) -> frozenset[Partition]:
        return frozenset((tp.topic, tp.partition) for tps in self._partitions.values() for tp in tps)

    def _relist(self) -> None:
        """Applies the lister's latest listing, if one came since the last poll."""
        listing = self._lister.take(self._tailed()) if self._lister is not None else None
        if listing is not None:
            self._track(listing)

    def _transient(self, what: str) -> None:
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_EVERY_S:
            self._error_logged_at = now
            log.warning("lag tail: %s (going on)", what)

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
        samples = {}
        for tp in self._partitions[stage.name]:
            key = (tp.topic, tp.partition)
            label = stage.label(tp.topic, tp.partition)
            end = self._end[key]
            done = committed.get(label, -1)
            if done >= 0:
                self._committed[key] = done
            else:
                done = self._committed.get(key, -1)
            if done < 0:  # nothing committed yet: the group starts from the log start
                done = self._start[key]
            exact, interpolated = self.clock.age(key, done, end, now)
            partitions[label] = PartitionLag(tp.topic, tp.partition, end, done, max(0, end - done), exact, interpolated)
            samples[key] = (end, done)
            end_sum += end
            done_sum += done
            lag += max(0, end - done)
        arrived, progressed = self._progress[stage.name].update(samples)
        return StageLag(stage.name, lag, end_sum, done_sum, partitions, arrived, progressed)

    def close(self) -> None:
        if self._lister is not None:
            self._lister.close()
        self._tail.close()
        for consumer in self._offsets.values():
            consumer.close()
