"""The gateway's tidegate Client per tenant, started on the tenant's first request.

A start that fails (the broker slow, a topic without a leader yet) is not tried
again on every request: each try takes seconds (a start waits on the broker, the
pressure listener retries for up to a minute), and tries are serialised under one
lock, so a bad minute piled every request up behind it. After a failed start the
tenant's requests are answered at once, 503 `unavailable` with a `retry-after`,
for a window that doubles with each failure in a row (1 s, 2 s, ... 30 s) and ends
with the first start that succeeds. Requests that queued behind the failing start
are answered the same way as soon as it fails. The failed start itself closes
what it opened and deletes the reply topic it created (Client.start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

from prometheus_client import Counter

from streams import Client, Settings
from streams.exceptions import TidegateError

log = logging.getLogger(__name__)

START_BACKOFF_S = 1.0  # the window after a first failed start
START_BACKOFF_MAX_S = 30.0
START_FAILURES = Counter("tidegate_gateway_client_start_failures", "Tenant clients' starts that failed, all tenants")


class ClientNotStarted(TidegateError):
    """A tenant's Kafka client did not start (the broker unreachable, say), now or in
    a try a moment ago; `retry_after_ms`: when the next request tries again."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass(slots=True)
class StartBackoff:
    """A tenant's failed starts in a row, and until when no start is tried."""

    failures: int = 0
    until: float = 0.0  # monotonic
    reason: str = ""

    def failed(self, reason: str, now: float) -> None:
        self.failures += 1
        self.until = now + min(START_BACKOFF_MAX_S, START_BACKOFF_S * 2 ** (self.failures - 1))
        self.reason = reason

    def remaining_ms(self, now: float) -> int:
        """Milliseconds left in the window (0: a start may be tried)."""
        return max(0, math.ceil((self.until - now) * 1000))


class TenantClients:
    """The started clients by tenant, each started once, with a backoff after a failure."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._clients: dict[str, Client] = {}
        self._backoff: dict[str, StartBackoff] = {}
        # one per tenant (the keys file's, a bounded set): a tenant's start that fails
        # slowly (its listener retries for up to a minute) holds no other tenant's
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, tenant: str) -> Client:
        """The tenant's client, started on its first request.

        :raises ClientNotStarted: its start failed now, or a moment ago (in the backoff window).
        """
        client = self._clients.get(tenant)
        if client is not None:
            return client
        self._refuse_in_backoff(tenant)
        async with self._locks.setdefault(tenant, asyncio.Lock()):
            if tenant in self._clients:
                return self._clients[tenant]
            self._refuse_in_backoff(tenant)  # the start this request queued behind failed
            client = Client(settings=self.settings, tenant=tenant, reply_grace_s=5)
            try:
                await client.start()  # closes what it opened, deletes its reply topic, when it fails
            except Exception as exc:
                START_FAILURES.inc()
                backoff = self._backoff.setdefault(tenant, StartBackoff())
                backoff.failed(str(exc), time.monotonic())
                retry_ms = backoff.remaining_ms(time.monotonic())
                log.warning(
                    "tenant=%s client not started (failure %d in a row, next try in %d ms): %s",
                    tenant,
                    backoff.failures,
                    retry_ms,
                    exc,
                )
                raise ClientNotStarted(f"tenant {tenant}'s client: {exc}", retry_ms) from exc
            self._backoff.pop(tenant, None)
            self._clients[tenant] = client
            return client

    def started(self) -> list[Client]:
        """The clients started so far: their pressure boards tell the fleet (gateway/models.py)."""
        return list(self._clients.values())

    def _refuse_in_backoff(self, tenant: str) -> None:
        backoff = self._backoff.get(tenant)
        if backoff is None:
            return
        retry_ms = backoff.remaining_ms(time.monotonic())
        if retry_ms:
            raise ClientNotStarted(f"tenant {tenant}'s client did not start a moment ago: {backoff.reason}", retry_ms)

    async def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()
