"""Every offset commit of the stages' groups, read from Kafka's `__consumer_offsets`.

Committed offsets alone cannot tell a group that commits the same offset again
(STALL: it is alive and stuck) from one that stopped committing (STOP): the commit
log can, as Burrow reads it. Each record of `__consumer_offsets` with a key of
version 0 or 1 is an offset commit: key (version, group, topic, partition), value
(version, offset, [leader epoch from v3], metadata (a compact string from v4),
commit timestamp, ...). Other
key versions (group metadata) and tombstones are skipped.

The reader is group-less and assigned to every partition of the topic at its end:
it sees the commits made from its start on.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from streams.config import Settings
from streams.kafka import connection_config

OFFSETS_TOPIC = "__consumer_offsets"
RECHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class Commit:
    group: str
    topic: str
    partition: int
    offset: int
    committed_ms: int


def _string(data: bytes, at: int) -> tuple[str, int]:
    (size,) = struct.unpack_from(">h", data, at)
    at += 2
    return data[at : at + size].decode(errors="replace"), at + size


def _compact_string(data: bytes, at: int) -> tuple[str, int]:
    """A flexible version's string: unsigned varint of length + 1, then the bytes."""
    size, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    size -= 1
    return data[at : at + max(0, size)].decode(errors="replace"), at + max(0, size)


def parse_commit(key: bytes | None, value: bytes | None) -> Commit | None:
    """The commit a record of `__consumer_offsets` holds, or None (not a commit, or a
    value version this reader does not know)."""
    if not key or not value or len(key) < 2:
        return None
    try:
        return _parse(key, value)
    except (struct.error, IndexError):
        return None


def _parse(key: bytes, value: bytes) -> Commit | None:
    (key_version,) = struct.unpack_from(">h", key, 0)
    if key_version not in (0, 1):
        return None
    group, at = _string(key, 2)
    topic, at = _string(key, at)
    (partition,) = struct.unpack_from(">i", key, at)
    (value_version,) = struct.unpack_from(">h", value, 0)
    (offset,) = struct.unpack_from(">q", value, 2)
    at = 10
    if value_version >= 3:
        at += 4  # leader epoch
    # metadata: a plain string up to v3, a compact one from v4 (flexible versions)
    _, at = _compact_string(value, at) if value_version >= 4 else _string(value, at)
    (committed_ms,) = struct.unpack_from(">q", value, at)
    return Commit(group, topic, partition, offset, committed_ms)


class CommitLog:
    """Tails `__consumer_offsets`; keeps, per (group, topic, partition), the time of
    the last commit seen. Needs Apache Kafka (Tansu has no such topic: `available`
    stays False and no commit times are known)."""

    def __init__(self, settings: Settings, groups: set[str]) -> None:
        self.groups = groups
        self.last_commit_ms: dict[tuple[str, str, int], int] = {}
        self._consumer = Consumer(
            {
                **connection_config(settings),
                "group.id": f"tidegate-commit-log-{uuid.uuid4().hex}",  # never joined
                "enable.auto.commit": False,
                "fetch.wait.max.ms": settings.control_fetch_wait_ms,
            }
        )
        self.available = False
        self._checked_at = 0.0
        self._assign()

    def _assign(self) -> None:
        """Assigns the topic's partitions once it exists: Kafka creates it with the
        first group, which may come after the monitor (checked every second)."""
        self._checked_at = time.monotonic()
        try:
            meta = self._consumer.list_topics(OFFSETS_TOPIC, timeout=5).topics.get(OFFSETS_TOPIC)
        except KafkaException:
            return
        if meta is not None and meta.error is None and meta.partitions:
            self._consumer.assign([TopicPartition(OFFSETS_TOPIC, p, OFFSET_END) for p in meta.partitions])
            self.available = True

    def poll(self) -> None:
        if not self.available:
            if time.monotonic() - self._checked_at >= RECHECK_S:
                self._assign()
            return
        for message in self._consumer.consume(10_000, 0):
            if message.error() is not None:  # end of a partition, or a transient error
                continue
            commit = parse_commit(message.key(), message.value())
            if commit is not None and commit.group in self.groups:
                key = (commit.group, commit.topic, commit.partition)
                self.last_commit_ms[key] = max(self.last_commit_ms.get(key, 0), commit.committed_ms)

    def close(self) -> None:
        self._consumer.close()
