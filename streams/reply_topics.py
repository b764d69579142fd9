"""Whether a record's `reply_to` can be replied to: an allowed name, and a topic that exists.

A reply to a topic that does not exist is not refused at once: librdkafka holds it
until the topic appears or its metadata wait runs out, and a stage waiting on that
delivery stalls (the processors retried their batch forever, a worker crash-looped
on its partition). So both stages ask here first and dead-letter what cannot be
answered. Existence comes from the broker's metadata, cached: a name seen once is
trusted (a topic deleted later is met by the delivery's fallback, streams/outgoing.py),
a missing one is asked about again at most every `refresh_s`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from confluent_kafka import KafkaException

from streams.config import Settings
from streams.validation import reply_to_reason

log = logging.getLogger(__name__)


class MetadataSource(Protocol):
    """confluent_kafka's Producer, Consumer and AdminClient all have it."""

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...


class ReplyTopics:
    def __init__(self, settings: Settings, source: MetadataSource, refresh_s: float = 0.25) -> None:
        self.settings = settings
        self.source = source
        self.refresh_s = refresh_s
        self._known: set[str] = {settings.topics.replies}
        self._asked_at = -refresh_s

    def reason(self, reply_to: str, tenant: str | None = None) -> str | None:
        """None when replies may go to `reply_to`, else why not. A request from a
        tenant's own topic may name only that tenant's reply topics."""
        wrong = reply_to_reason(reply_to, self.settings, tenant)
        if wrong is not None:
            return wrong
        if reply_to in self._known:
            return None
        if time.monotonic() - self._asked_at >= self.refresh_s and not self._refresh():
            return None  # the broker did not answer: the delivery decides
        if reply_to in self._known:
            return None
        return f"reply_to topic {reply_to[:80]!r} does not exist"

    def _refresh(self) -> bool:
        self._asked_at = time.monotonic()
        try:
            topics = self.source.list_topics(timeout=5).topics
        except KafkaException as exc:
            log.warning("cannot list topics to check reply_to: %s", exc)
            return False
        replies = self.settings.topics.replies
        self._known |= {name for name in topics if name == replies or name.startswith(f"{replies}.")}
        return True
