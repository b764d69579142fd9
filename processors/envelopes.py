"""A consumed request record, the request admitted from it, and its ContextEnvelope.

The handler (processors/handler.py) decides which requests go on; this module
builds what one of them sends on: its context compressed into the token budget of
the model its route chose (processors/compression.py), and the envelope encoded,
with the kept history spliced in as stored (Avro bodies, never decoded for a
`window`), for the contexts topic of the route's pool, saying which model serves
it and, for a fallback, which was asked for and why (streams/routing.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from conversation.history import ENVELOPE, TURNS, StoredHistory, Turn
from conversation.tokens import TokenCounter
from processors.compression import compress, fit_new_turns, reads_newest_only
from schemas import AVRO, Codec, content_type_header
from streams import metrics
from streams.config import Settings
from streams.fleet import Fleet, load_fleet
from streams.outgoing import Outgoing, now_ms
from streams.routing import Route, first_route

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
    route: Route | None = None  # chosen at admission (processors/admission.py downstream)

    def count_new_turns(self, counts: Sequence[int]) -> None:
        """Sets each new turn's token count (counted for the whole batch at once)."""
        for turn, count in zip(self.new_turns, counts, strict=True):
            turn["tokens"] = count

    def quota_tokens(self) -> int:
        """What the request may cost at most: its own turns and its max_new_tokens."""
        return sum(t["tokens"] for t in self.new_turns) + self.request["max_new_tokens"]


class EnvelopeBuilder:
    def __init__(self, settings: Settings, counter: TokenCounter, codec: Codec, fleet: Fleet | None = None) -> None:
        self.settings = settings
        self.counter = counter
        self.codec = codec
        self.fleet = fleet if fleet is not None else load_fleet(settings)

    def route(self, item: Accepted) -> Route:
        """The item's route; one admitted without pressure to route by (backpressure
        off) goes to its model's heaviest pool (streams/routing.py first_route)."""
        if item.route is None:
            item.route = first_route(self.fleet, item.request.get("model") or "", item.request.get("fallbacks") or ())
        return item.route

    def turn_budget(self, item: Accepted) -> int:
        return max(1, self.route(item).model.token_budget - item.system_tokens)

    def history_room(self, item: Accepted) -> int | None:
        """Tokens of newest history the strategy can keep; None when it looks at all of it."""
        if not reads_newest_only(item.strategy):
            return None
        budget = self.turn_budget(item)
        return budget - sum(t["tokens"] for t in fit_new_turns(item.new_turns, budget, self.counter))

    def build(self, item: Accepted, degraded: bool) -> Outgoing:
        """The request's envelope; `degraded`: built without Redis (no history)."""
        request, route = item.request, self.route(item)
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
            "token_budget": route.model.token_budget,
            "tokens_used": context.tokens_used + item.system_tokens,
            "strategy": context.strategy,
            "turns_dropped": context.turns_dropped + item.history.skipped,
            "degraded": degraded or item.degraded,
            "queued_ms": max(0, item.started_ms - request["created_ms"]),
            "context_ms": forwarded - item.started_ms,
            "forwarded_ms": forwarded,
            "stream": request["stream"],
            "model": route.model.id,
            "pool": route.pool.name,
            "fallback_from": route.fallback_from,
            "fallback_reason": route.fallback_reason,
        }
        # kept history goes in as stored (Avro bodies); only the request's own turns are encoded
        bodies = [item.history.bodies[i] for i in context.kept]
        bodies += [self.codec.encode_item(ENVELOPE, TURNS, t) for t in context.new_turns]
        value = self.codec.encode_with_items(ENVELOPE, envelope, TURNS, bodies)
        if route.fallback_reason is not None:
            metrics.FALLBACKS.labels(route.fallback_from, route.fallback_reason).inc()
        return Outgoing(route.pool.contexts_topic, request["session_id"].encode(), value, [content_type_header(AVRO)])
