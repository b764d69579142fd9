"""A consumed request record, the request admitted from it, and its ContextEnvelope.

The handler (processors/handler.py) decides which requests go on; this module
builds what one of them sends on: its context compressed into the token budget
(processors/compression.py) and the envelope encoded, with the kept history
spliced in as stored (Avro bodies, never decoded for a `window`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from conversation.history import ENVELOPE, TURNS, StoredHistory, Turn
from conversation.tokens import TokenCounter
from processors.compression import compress, fit_new_turns, reads_newest_only
from schemas import AVRO, Codec, content_type_header
from streams.config import Settings
from streams.outgoing import Outgoing, now_ms

ENVELOPE_VERSION = 4


@dataclass(slots=True)
class Incoming:
    """One consumed record, whatever client read it."""

    value: bytes | None
    key: bytes | None
    headers: Sequence[tuple[str, bytes]]
    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class Accepted:
    """A request that passed its checks, on its way to an envelope."""

    record: Incoming
    request: dict[str, Any]
    encoding: str
    started_ms: int
    system_prompt: str
    system_tokens: int
    strategy: str
    new_turns: list[Turn] = field(default_factory=list)
    history: StoredHistory = field(default_factory=StoredHistory)
    cached_vectors: dict[bytes, bytes] = field(default_factory=dict)  # digest -> embedding
    new_vectors: dict[str, bytes] = field(default_factory=dict)  # to store
    similarity: list[float] | None = None
    degraded: bool = False  # built with less than it asked for (relevance without its model)
    taken_back: bool = False  # no longer counted as admitted (processors/admission.py take_back)
    answered: bool = False  # replied to already in this batch (over quota, failed alone)


class EnvelopeBuilder:
    def __init__(self, settings: Settings, counter: TokenCounter, codec: Codec) -> None:
        self.settings = settings
        self.counter = counter
        self.codec = codec

    def turn_budget(self, item: Accepted) -> int:
        return max(1, self.settings.token_budget - item.system_tokens)

    def history_room(self, item: Accepted) -> int | None:
        """Tokens of newest history the strategy can keep; None when it looks at all of it."""
        if not reads_newest_only(item.strategy):
            return None
        budget = self.turn_budget(item)
        return budget - sum(t["tokens"] for t in fit_new_turns(item.new_turns, budget, self.counter))

    def build(self, item: Accepted, degraded: bool) -> Outgoing:
        """The request's envelope; `degraded`: built without Redis (no history)."""
        request = item.request
        context = compress(
            item.strategy, item.history, item.new_turns, self.turn_budget(item), self.counter, item.similarity
        )
        forwarded = now_ms()
        envelope = {
            "version": ENVELOPE_VERSION,
            "request_id": request["request_id"],
            "session_id": request["session_id"],
            "tenant": request["tenant"],
            "reply_to": request["reply_to"],
            "reply_encoding": item.encoding,
            "priority": request["priority"],
            "max_new_tokens": request["max_new_tokens"],
            "temperature": request["temperature"],
            "created_ms": request["created_ms"],
            "deadline_ms": request["deadline_ms"],
            "system_prompt": item.system_prompt,
            "turns": [],  # spliced in below
            "summary": context.summary,
            "token_budget": self.settings.token_budget,
            "tokens_used": context.tokens_used + item.system_tokens,
            "strategy": context.strategy,
            "turns_dropped": context.turns_dropped + item.history.skipped,
            "degraded": degraded or item.degraded,
            "queued_ms": max(0, item.started_ms - request["created_ms"]),
            "context_ms": forwarded - item.started_ms,
            "forwarded_ms": forwarded,
            "stream": request["stream"],
        }
        # kept history goes in as stored (Avro bodies); only the request's own turns are encoded
        bodies = [item.history.bodies[i] for i in context.kept]
        bodies += [self.codec.encode_item(ENVELOPE, TURNS, t) for t in context.new_turns]
        value = self.codec.encode_with_items(ENVELOPE, envelope, TURNS, bodies)
        return Outgoing(
            self.settings.topics.contexts, request["session_id"].encode(), value, [content_type_header(AVRO)]
        )
