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
`LIST_WAIT_S` in all; the loop goes on meanwhile. The worker (synchronous) asks the
same way for each fetch of records from its consumer, before they are decoded
(`prepare_blocking`, inference/jobs.py): one listing per fetch, never one per
record. Before, each unseen name made a listing on the loop itself (up to 5 s each,
every record again while the broker did not answer): a batch of made-up names
stopped the loop, its heartbeats and commits (the worker: its running batch's
decode steps), for minutes. The names kept (trusted and missing) are each at most
`KEPT` (least recently asked dropped first), not every name ever seen.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
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
        self._listing: concurrent.futures.Future[set[str] | None] | None = None  # the one in flight, if any
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
        unseen, now, deadline = self._unseen(names)
        while unseen:
            listing, began = self._listing_in_flight()
            try:
                waited = asyncio.shield(asyncio.wrap_future(listing))
                listed = await asyncio.wait_for(waited, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self._gave_up(unseen)
                return
            unseen = self._settle(listed, began, now, unseen)

    def prepare_blocking(self, names: Iterable[str]) -> None:
        """`prepare` for a synchronous caller (the worker, between two decode steps):
        the same one listing for all of a fetched batch's unseen names, the same
        bounded wait (`wait_s` in all), blocking the caller for at most that long."""
        unseen, now, deadline = self._unseen(names)
        while unseen:
            listing, began = self._listing_in_flight()
            try:
                listed = listing.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self._gave_up(unseen)
                return
            unseen = self._settle(listed, began, now, unseen)

    def _unseen(self, names: Iterable[str]) -> tuple[set[str], float, float]:
        """The names a listing must decide; when they were seen; when the wait ends."""
        now = time.monotonic()
        shared = self.settings.topics.replies
        unseen = {
            n for n in names if n != shared and reply_to_reason(n, self.settings) is None and self._undecided(n, now)
        }
        return unseen, now, now + self.wait_s

    def _listing_in_flight(self) -> tuple[concurrent.futures.Future[set[str] | None], float]:
        """The listing running now (one at a time), started in a thread if none is; when it began."""
        if self._listing is None or self._listing.done():
            listing: concurrent.futures.Future[set[str] | None] = concurrent.futures.Future()

            def run() -> None:
                try:
                    listing.set_result(self._list())
                except BaseException as exc:  # the waiter sees it, the thread ends
                    listing.set_exception(exc)

            self._listing, self._listing_began = listing, time.monotonic()
            threading.Thread(target=run, name="tidegate-reply-topics", daemon=True).start()
        return self._listing, self._listing_began

    def _settle(self, listed: set[str] | None, began: float, now: float, unseen: set[str]) -> set[str]:
        """Learns what `listed` says of `unseen` (seen at `now`); the names still undecided."""
        if listed is None:
            return set()  # the broker did not answer: the delivery decides
        if began >= now:
            self._learn(listed, unseen, now)
            return set()
        self._learn(listed, unseen & listed, now)
        return unseen - listed

    def _gave_up(self, unseen: set[str]) -> None:
        log.warning("no listing in %.1fs; %d reply_to names left to the delivery", self.wait_s, len(unseen))

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
