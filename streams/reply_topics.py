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

Bounded in time and memory: the processors (an asyncio loop) ask once per batch,
for all its unseen names together, in a thread (`prepare`), and wait at most
`LIST_WAIT_S` in all; the loop goes on meanwhile. Before, each unseen name made a
listing on the loop itself (up to 5 s each, every record again while the broker
did not answer): a batch of made-up names stopped the loop, its heartbeats and
commits, for minutes. The names kept (trusted and missing) are each at most
`KEPT` (least recently asked dropped first), not every name ever seen.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

from confluent_kafka import KafkaException

from streams.config import Settings
from streams.validation import reply_to_reason

log = logging.getLogger(__name__)

KEPT = 10_000  # names remembered as existing, and as missing (a flood of made-up names stays bounded)
LIST_TIMEOUT_S = 5.0  # the metadata request's own timeout
LIST_WAIT_S = 2.0  # what a batch waits for a listing; past it, its unseen names are the delivery's to decide


class MetadataSource(Protocol):
    """confluent_kafka's Producer, Consumer and AdminClient all have it."""

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...


class ReplyTopics:
    def __init__(
        self,
        settings: Settings,
        source: MetadataSource,
        refresh_s: float = 0.25,
        kept: int = KEPT,
        wait_s: float = LIST_WAIT_S,
    ) -> None:
        self.settings = settings
        self.source = source
        self.refresh_s = refresh_s
        self.kept = kept
        self.wait_s = wait_s
        # names found existing / missing -> when (monotonic), least recently asked first
        self._known: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._missing: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._listing: asyncio.Future[set[str] | None] | None = None  # the one in flight, if any
        self._listing_began = 0.0  # monotonic

    def reason(self, reply_to: str, tenant: str | None = None, ask: bool = True) -> str | None:
        """None when replies may go to `reply_to`, else why not. A request from a
        tenant's own topic may name only that tenant's reply topics. `ask`: list the
        broker's topics (blocking) for a name not decided yet; without it (after
        `prepare`) such a name is the delivery's to decide."""
        wrong = reply_to_reason(reply_to, self.settings, tenant)
        if wrong is not None:
            return wrong
        if reply_to == self.settings.topics.replies:  # the deployment's own: created with the stack
            return None
        now = time.monotonic()
        if self._undecided(reply_to, now):
            listed = self._list() if ask else None
            if listed is None:
                return None  # the broker did not answer: the delivery decides
            self._learn(listed, [reply_to], now)
        if reply_to in self._known:
            self._known.move_to_end(reply_to)
            return None
        return f"reply_to topic {reply_to[:80]!r} does not exist"

    async def prepare(self, names: Iterable[str]) -> None:
        """Decides the batch's unseen names with one listing, in a thread, waiting at
        most `wait_s` in all: the caller's loop is never blocked on the broker. A
        listing still running from an earlier batch is waited for rather than doubled;
        as it began before these names were seen, it can say which exist, not which
        are missing (their topics may be a moment younger): for those a new one."""
        now = time.monotonic()
        deadline = now + self.wait_s
        shared = self.settings.topics.replies
        unseen = {
            n for n in names if n != shared and reply_to_reason(n, self.settings) is None and self._undecided(n, now)
        }
        while unseen:
            if self._listing is None or self._listing.done():
                self._listing_began = time.monotonic()
                self._listing = asyncio.ensure_future(asyncio.to_thread(self._list))
            listing, began = self._listing, self._listing_began
            try:
                listed = await asyncio.wait_for(asyncio.shield(listing), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("no listing in %.1fs; %d reply_to names left to the delivery", self.wait_s, len(unseen))
                return
            if listed is None:
                return  # the broker did not answer: the delivery decides
            if began >= now:
                self._learn(listed, unseen, now)
                return
            self._learn(listed, unseen & listed, now)
            unseen -= listed

    def _undecided(self, name: str, now: float) -> bool:
        if name in self._known:
            return False
        asked = self._missing.get(name)
        return asked is None or now - asked >= self.refresh_s

    def _learn(self, listed: set[str], asked: Iterable[str], now: float) -> None:
        for name in asked:
            found, other = (self._known, self._missing) if name in listed else (self._missing, self._known)
            other.pop(name, None)
            found[name] = now
            found.move_to_end(name)
            while len(found) > self.kept:
                found.popitem(last=False)

    def _list(self) -> set[str] | None:
        """The reply topics the broker lists now; None when it did not answer."""
        try:
            topics = self.source.list_topics(timeout=LIST_TIMEOUT_S).topics
        except KafkaException as exc:
            log.warning("cannot list topics to check reply_to: %s", exc)
            return None
        replies = self.settings.topics.replies
        return {name for name in topics if name == replies or name.startswith(f"{replies}.")}
