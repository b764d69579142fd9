"""What a stage sends: replies in the caller's encoding, envelopes, and dead letters.

Built here once and sent with confluent-kafka: from asyncio through
streams/delivery.py (processors, client), from the workers' loop directly.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas import AVRO, content_type_header, get_codec

# the statuses a stage sends (`rate_limited`: a tenant over its quota, processors/quotas.py)
REPLY_STATUSES = ("ok", "queue_full", "rate_limited", "expired", "invalid", "error")
TIMING_FIELDS = ("queued_ms", "context_ms", "batch_wait_ms", "inference_ms", "total_ms")
# A dead letter keeps at most this much of the original value: a record can be as
# large as the broker's limit, and the dead letter adds headers to it, so a full-size
# record would be refused by the dead-letter topic (and was lost with its batch).
DEAD_LETTER_MAX_BYTES = 256 * 1024


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class Outgoing:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    # sent instead when the broker refuses this record for good (its topic is gone,
    # not writable, or it is too large): the input's dead letter, so the record that
    # could not be answered is neither retried forever nor lost
    fallback: Outgoing | None = None


def build_reply(
    request: Mapping[str, Any],
    status: str,
    *,
    text: str = "",
    error: str | None = None,
    retry_after_ms: int | None = None,
    model: str = "",
    tokens_in: int = 0,
    tokens_out: int = 0,
    cache_hit: bool = False,
    degraded: bool = False,
    timings: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """An InferenceReply for `request` (a request or an envelope); total_ms is filled in,
    and an envelope's fallback (the model asked for, and why another served it)
    is carried over."""
    if status not in REPLY_STATUSES:
        raise ValueError(f"unknown reply status {status!r}")
    replied = now_ms()
    stage_timings = {name: 0 for name in TIMING_FIELDS}
    stage_timings.update(timings or {})
    created = int(request.get("created_ms") or 0)
    stage_timings["total_ms"] = max(0, replied - created) if created else 0
    return {
        "request_id": request["request_id"],
        "session_id": request.get("session_id", ""),
        "status": status,
        "text": text,
        "error": error,
        "retry_after_ms": retry_after_ms,
        "model": model,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cache_hit": cache_hit,
        "degraded": degraded,
        "timings": stage_timings,
        "replied_ms": replied,
        "fallback_from": request.get("fallback_from"),
        "fallback_reason": request.get("fallback_reason"),
    }


def reply_message(reply: Mapping[str, Any], reply_to: str, encoding: str = AVRO) -> Outgoing:
    """The reply as a record for `reply_to`, in the encoding the request came in; one no
    fallback served in the schema from before fleets (Codec.encode_readable): a caller's
    client not upgraded yet reads it."""
    value = get_codec().encode_readable_as("InferenceReply", reply, encoding)
    return Outgoing(reply_to, str(reply["request_id"]).encode(), value, [content_type_header(encoding)])


def chunk_message(
    request_id: str, index: int, text: str, tokens_out: int, reply_to: str, generation: str = ""
) -> Outgoing:
    """A piece of a streamed reply for `reply_to` (always Avro: streaming callers are
    tidegate's client and gateway). `generation` names the run that wrote it (a
    worker instance and its attempt): `index` counts within it (streams/stitching.py)."""
    record = {
        "request_id": request_id,
        "index": index,
        "text": text,
        "tokens_out": tokens_out,
        "sent_ms": now_ms(),
        "generation": generation,
    }
    value = get_codec().encode("InferenceChunk", record)
    return Outgoing(reply_to, request_id.encode(), value, [content_type_header(AVRO)])


def dead_letter(
    topic: str,
    value: bytes | None,
    key: bytes | None,
    *,
    reason: str,
    source_topic: str,
    partition: int,
    offset: int,
    stage: str,
) -> Outgoing:
    """The original bytes, with why and where from in the headers. A value over
    DEAD_LETTER_MAX_BYTES keeps its first DEAD_LETTER_MAX_BYTES, and the headers say
    so: `original.size` and `original.sha256` of the whole value."""
    value = value or b""
    headers = [
        ("error", reason.encode(errors="replace")[:4000]),
        ("source.topic", source_topic.encode()),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
        ("stage", stage.encode()),
        ("failed.at.ms", str(now_ms()).encode()),
    ]
    if len(value) > DEAD_LETTER_MAX_BYTES:
        headers += [
            ("truncated", b"true"),
            ("original.size", str(len(value)).encode()),
            ("original.sha256", hashlib.sha256(value).hexdigest().encode()),
        ]
        value = value[:DEAD_LETTER_MAX_BYTES]
    if key is not None and len(key) > DEAD_LETTER_MAX_BYTES:
        key = key[:DEAD_LETTER_MAX_BYTES]
    return Outgoing(topic, key, value, headers)
