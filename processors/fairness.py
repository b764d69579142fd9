"""Weighted fair shares of admissions while the path is near full.

Backpressure alone refuses every tenant alike once the workers' lag nears its cap,
so a tenant flooding the pipeline takes nearly all admissions and a light tenant's
requests are refused as often as the flood's. Here, while the workers' stage is
past its warn line, a tenant whose admissions over the last `window_s` are more
than its weighted share (its weight over the weights of the tenants admitted in
the window, itself included) is refused `queue_full`; under its share it passes.
Below the warn line nobody is held back: a share only matters when admissions are
scarce. A tenant under its share, with others admitted in the window, is let in
up to the high-priority line past the cap (as a `high` request would be): the flood
that filled the queue is what is refused there, not the tenant that kept to its
share. Each processor counts its own admissions (its partitions' tenants): with
several processors the shares are per processor.
"""

from __future__ import annotations

import collections
import time

from streams.tenants import Tenants


class FairShares:
    def __init__(self, tenants: Tenants, window_s: float) -> None:
        self.tenants = tenants
        self.window_s = window_s
        self._admitted: collections.deque[tuple[float, str]] = collections.deque()
        self._counts: collections.Counter[str] = collections.Counter()

    def standing(self, tenant: str, now: float | None = None) -> str:
        """`over` when admitting one more of `tenant`'s requests takes it past its
        share, `under` when it stays within it while others were admitted too, else
        `alone` (nobody else to share with)."""
        self._forget(time.monotonic() if now is None else now)
        total = sum(self._counts.values())
        if not total or set(self._counts) == {tenant}:
            return "alone"
        active = set(self._counts) | {tenant}
        weights = sum(self.tenants.policy(t).weight for t in active)
        share = self.tenants.policy(tenant).weight / weights
        return "over" if (self._counts[tenant] + 1) / (total + 1) > share else "under"

    def admitted(self, tenant: str, now: float | None = None) -> None:
        at = time.monotonic() if now is None else now
        self._admitted.append((at, tenant))
        self._counts[tenant] += 1

    def withdraw(self, tenant: str) -> None:
        """Takes back `tenant`'s newest admission: a later check (its quota) refused it."""
        for i in range(len(self._admitted) - 1, -1, -1):
            if self._admitted[i][1] == tenant:
                del self._admitted[i]
                self._counts[tenant] -= 1
                if not self._counts[tenant]:
                    del self._counts[tenant]
                return

    def _forget(self, now: float) -> None:
        while self._admitted and self._admitted[0][0] < now - self.window_s:
            _, tenant = self._admitted.popleft()
            self._counts[tenant] -= 1
            if not self._counts[tenant]:
                del self._counts[tenant]
