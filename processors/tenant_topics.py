"""The request topics the processors read, the tenants' own included, kept current.

With TENANT_TOPICS each tenant writes its own `<requests>.<tenant>`, and a tenant is
added while the processors run (tidegate/tenancy.py). faust-streaming 0.15.3
subscribes its consumer to a list of names (a pattern subscription took one
partition of one topic here: its aiokafka driver notes "pattern does not work"),
so the list is made again every TENANT_TOPICS_REFRESH_S and, when it changed, the
agent's channel is given the new names and faust resubscribes (one rebalance). A
tenant added at run time used to be read only once the processors restarted.

Built on faust's Conductor (0.15.3, pinned in pyproject.toml): `discard` and `add`
of a channel are how faust itself marks a subscription change; its wait before
resubscribing (`_resubscribe_sleep_lock_seconds`, 45 s, to coalesce agents
starting) is cut to RESUBSCRIBE_WAIT_S; a change it dropped because a rebalance was
under way (it does that) is flagged again at the next refresh.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streams.config import Settings
from streams.kafka import admin_client

log = logging.getLogger(__name__)

RESUBSCRIBE_WAIT_S = 1.0
LIST_TIMEOUT_S = 10.0


def listed_request_topics(settings: Settings, admin: AdminClient | None = None) -> list[str] | None:
    """The shared request topic and, with TENANT_TOPICS, the tenants' own as the
    broker lists them now; None when it did not answer."""
    topics = settings.topics
    if not settings.tenant_topics:
        return [topics.requests]
    own = re.compile(topics.tenant_requests_pattern)
    try:
        listed = (admin or admin_client(settings)).list_topics(timeout=LIST_TIMEOUT_S).topics
    except KafkaException as exc:
        log.warning("cannot list the tenants' request topics: %s", exc)
        return None
    return [topics.requests, *sorted(name for name in listed if own.match(name))]


class TenantTopics:
    """Resubscribes a faust app's request channel when the tenants' topics change."""

    def __init__(self, settings: Settings, app: Any) -> None:
        self.settings = settings
        self.app = app
        self._admin: AdminClient | None = None  # made in the first refresh's thread
        app.topics._resubscribe_sleep_lock_seconds = RESUBSCRIBE_WAIT_S

    async def refresh(self) -> bool:
        """Lists the topics (in a thread: the loop goes on) and resubscribes when they
        changed, or when an earlier change has not reached the subscription yet."""
        try:
            listed = await asyncio.to_thread(self._list)
            return listed is not None and self.apply(listed)
        except Exception:  # the next refresh tries again; the timer must not die
            log.exception("refreshing the request topics failed")
            return False

    def _list(self) -> list[str] | None:
        if self._admin is None:
            self._admin = admin_client(self.settings)
        return listed_request_topics(self.settings, self._admin)

    def apply(self, listed: list[str]) -> bool:
        """Gives the request channels `listed`; True when that changed them."""
        conductor = self.app.topics
        changed = False
        for channel in self._request_channels():
            if set(channel.topics) != set(listed):
                log.warning("request topics now %d (was %d): resubscribing", len(listed), len(channel.topics))
                channel.topics = list(listed)
                changed = True
            elif not conductor._topic_contain_unsubscribed_topics(channel):
                continue
            conductor.discard(channel)  # faust's own way to flag a subscription change
            conductor.add(channel)
        return changed

    def _request_channels(self) -> list[Any]:
        shared = self.settings.topics.requests
        return [channel for channel in list(self.app.topics) if shared in channel.topics]
