"""Whether a record's `reply_to` can be replied to: an allowed name, and a topic that exists.

A reply to a topic that does not exist is not refused at once: librdkafka holds it
until the topic appears or its metadata wait runs out, and a stage waiting on that
delivery stalls (the processors retried their batch forever, a worker crash-looped
on its partition). So both stages ask here first and dead-letter what cannot be
answered. Existence comes from the broker's metadata, cached: a name seen once is
trusted (a topic deleted later is met by the delivery's fallback, streams/outgoing.py).
A name not seen yet is always asked about (a client creates its reply topic just
before its first request: a listing from a moment earlier does not have it), and a
missing one again at most every `refresh_s`; the full listing is asked for, never
the one topic (a metadata request naming a topic can create it where the broker
auto-creates topics).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Protocol

from confluent_kafka import KafkaException

from streams.config import Settings
from streams.validation import reply_to_reason

log = logging.getLogger(__name__)


MISSING_KEPT = 10_000  # names remembered as missing (a flood of made-up names stays bounded)


class MetadataSource(Protocol):
    """confluent_kafka's Producer, Consumer and AdminClient all have it."""

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...


class ReplyTopics:
    def __init__(self, settings: Settings, source: MetadataSource, refresh_s: float = 0.25) -> None:
        self.settings = settings
        self.source = source
        self.refresh_s = refresh_s
        self._known: set[str] = {settings.topics.replies}
        # names found missing -> when (monotonic), oldest first, at most MISSING_KEPT
        self._missing: collections.OrderedDict[str, float] = collections.OrderedDict()

    def reason(self, reply_to: str, tenant: str | None = None) -> str | None:
        """None when replies may go to `reply_to`, else why not. A request from a
        tenant's own topic may name only that tenant's reply topics."""
        wrong = reply_to_reason(reply_to, self.settings, tenant)
        if wrong is not None:
            return wrong
        if reply_to in self._known:
            return None
        now = time.monotonic()
        asked = self._missing.get(reply_to)
        if (asked is None or now - asked >= self.refresh_s) and not self._refresh():
            return None  # the broker did not answer: the delivery decides
        if reply_to in self._known:
            self._missing.pop(reply_to, None)
            return None
        if asked is None or now - asked >= self.refresh_s:
            self._missing[reply_to] = now
            self._missing.move_to_end(reply_to)
            while len(self._missing) > MISSING_KEPT:
                self._missing.popitem(last=False)
        return f"reply_to topic {reply_to[:80]!r} does not exist"

    def _refresh(self) -> bool:
        try:
            topics = self.source.list_topics(timeout=5).topics
        except KafkaException as exc:
            log.warning("cannot list topics to check reply_to: %s", exc)
            return False
        replies = self.settings.topics.replies
        self._known |= {name for name in topics if name == replies or name.startswith(f"{replies}.")}
        return True
