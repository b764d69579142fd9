"""What a caller gets back for a request: a typed view of an InferenceReply record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["ok", "queue_full", "expired", "rate_limited", "invalid", "error"]


@dataclass(frozen=True, slots=True)
class StageTimings:
    """Milliseconds per stage: created -> picked up by a processor (`queued_ms`),
    building the context (`context_ms`), waiting for a batch (`batch_wait_ms`),
    generating (`inference_ms`), and created -> reply produced (`total_ms`)."""

    queued_ms: int = 0
    context_ms: int = 0
    batch_wait_ms: int = 0
    inference_ms: int = 0
    total_ms: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one request. `status` is `ok` (then `text` holds the completion),
    `queue_full` (`retry_after_ms` says when to try again), `expired`, `invalid` or
    `error` (then `error` says why); `rate_limited` is reserved for quotas. `model`
    is the model that served it; where a fallback did, `fallback_from` names the
    model asked for and `fallback_reason` why (`full`, `circuit_open`, `error`)."""

    request_id: str
    status: Status
    session_id: str = ""
    text: str = ""
    error: str | None = None
    retry_after_ms: int | None = None
    model: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cache_hit: bool = False
    degraded: bool = False
    timings: StageTimings = dataclasses.field(default_factory=StageTimings)
    replied_ms: int = 0
    fallback_from: str | None = None
    fallback_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Reply:
        """From a decoded InferenceReply (Avro or JSON); unknown fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in record.items() if k in names}
        timings = record.get("timings") or {}
        fields["timings"] = StageTimings(**{k: int(timings.get(k, 0)) for k in _TIMING_NAMES})
        return cls(**fields)

    def to_record(self) -> dict[str, Any]:
        """The InferenceReply record (what the codec encodes)."""
        return dataclasses.asdict(self)


_TIMING_NAMES = tuple(f.name for f in dataclasses.fields(StageTimings))


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a streamed reply (`Client.stream`): `text` is what was generated
    since the chunk before. The last chunk carries the final `reply` (any status),
    and the rest of its text; with `restart` set, its text is the whole of
    `reply.text` and replaces every chunk before it (the reply came from another
    generation than the one streamed, streams/stitching.py). `generation`: the run
    of the request that wrote the text (a worker instance and its attempt)."""

    request_id: str
    index: int
    text: str
    tokens_out: int = 0
    reply: Reply | None = None
    generation: str = ""
    restart: bool = False
