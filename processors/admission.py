"""Which of a batch's accepted requests go on, checked in the order that charges a
tenant's quota only for work that is admitted.

1. `downstream`: backpressure and fair share (the pools that could serve it near or
   past their caps, streams/routing.py, processors/fairness.py), decided request by
   request in batch order and counted on the pool it is routed to as each passes, so
   a batch cannot overshoot a cap; the item keeps its route for its envelope.
2. The handler reads each passed request's history, and with it whether it was
   claimed before (a redelivered duplicate: nothing to forward, nothing to charge).
3. `within_quotas` (processors/quotas.py): one Redis round trip for the fresh ones.
A request not forwarded after 1 (refused at 3, claimed before, failed alone) is
taken back from 1's counts (`take_back`: the pressure board's and the fair shares').
A request refused at 1 is refused before its claim is read: the handler sends that
refusal only if the request was never claimed (processors/refusals.py), so a
redelivered duplicate is never told `queue_full` beside its worker's reply.

With quotas first (as before), a caller refused `queue_full` spent its tenant's
quota on every retry, a redelivered duplicate spent it again, and a tenant could
be `rate_limited` for work the pipeline never did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError

from processors.fairness import FairShares
from processors.quotas import Quotas, too_large
from streams.outgoing import Outgoing
from streams.routing import NoRoute, Route

STAGE = "processors"

# the route of a request (its pool, model, fallback), or why no pool can take it now;
# a request it let through is counted on its pool until released or forgotten
Admission = Callable[[dict[str, Any]], Route | NoRoute]
# takes back an admission a later check refused: it is in no stage's lag
Release = Callable[[dict[str, Any]], None]
# (stage, retry_after_ms) while every pool that could serve the request is past its
# warn line, else None
NearFull = Callable[[dict[str, Any]], tuple[str, int] | None]


class Admissible(Protocol):
    request: dict[str, Any]
    taken_back: bool
    route: Route | None


Item = TypeVar("Item", bound=Admissible)
Answer = TypeVar("Answer")
# (item, status, error, retry_after_ms, stage) -> the reply that refuses it (or what
# builds it once its claim was looked up: processors/refusals.py)
Refuse = Callable[[Item, str, str, int | None, str], Answer]


class AdmissionGate:
    def __init__(
        self,
        admission: Admission | None,
        release: Release | None,
        near_full: NearFull | None,
        fair_shares: FairShares | None,
        quotas: Quotas | None,
        on_redis_down: Callable[[Exception], None],
    ) -> None:
        self.admission = admission
        self.release = release
        self.near_full = near_full
        self.fair_shares = fair_shares
        self.quotas = quotas
        self.on_redis_down = on_redis_down

    def downstream(self, items: list[Item], out: list[Answer], refuse: Refuse[Item, Answer]) -> list[Item]:
        """The requests a pool can take, each with its route: near the caps each tenant
        is held to its fair share, past them every request of the priority is refused."""
        if self.admission is None:
            return items
        passed = []
        for item in items:
            request = item.request
            tenant = request["tenant"]
            standing = self.fair_shares.standing(tenant) if self.fair_shares is not None else "alone"
            # asked only when it refuses: each answer hands out a retry time
            near_full = self.near_full(request) if self.near_full is not None and standing == "over" else None
            if near_full is not None:
                stage, retry_after_ms = near_full
                why = f"tenant {tenant!r} is past its fair share of admissions while stage {stage} is near its cap"
                out.append(refuse(item, "queue_full", why, retry_after_ms, stage))
                continue
            if request["priority"] == "normal" and standing == "under":
                routed = self.admission({**request, "priority": "high"})  # within its share: up to the high line
            else:
                routed = self.admission(request)
            if isinstance(routed, NoRoute):
                out.append(refuse(item, "queue_full", routed.why, routed.retry_after_ms, routed.stage))
                continue
            item.route = routed
            if self.fair_shares is not None:
                self.fair_shares.admitted(tenant)
            passed.append(item)
        return passed

    async def within_quotas(
        self, items: list[Item], out: list[Outgoing], refuse: Refuse[Item, Outgoing], cost: Callable[[Item], int]
    ) -> list[Item]:
        """The requests within their tenants' quotas (one Redis round trip); the others
        are answered `rate_limited` with the exact retry time, or `invalid` when no
        minute's quota could ever cover them, and taken back from the admissions.
        A request id twice in `items` is charged once."""
        if self.quotas is None or not items:
            return items
        charged: dict[tuple[str, str], int] = {}
        for i, item in enumerate(items):
            charged.setdefault((item.request["tenant"], item.request["request_id"]), i)
        asked = sorted(charged.values())
        asks = [(items[i].request["tenant"], cost(items[i])) for i in asked]
        try:
            decisions = await self.quotas.decide(asks)
        except (RedisError, OSError) as exc:
            self.on_redis_down(exc)
            return items
        refused: set[tuple[str, str]] = set()
        for i, (tenant, tokens), decision in zip(asked, asks, decisions, strict=True):
            oversized = too_large(self.quotas.tenants.policy(tenant), tokens)
            if oversized is not None:
                out.append(refuse(items[i], "invalid", oversized, None, STAGE))
            elif decision is not None and not decision.passed:
                why = f"tenant {tenant!r} is over its quota; retry after {decision.retry_after_ms} ms"
                out.append(refuse(items[i], "rate_limited", why, decision.retry_after_ms, STAGE))
            else:
                continue
            refused.add((tenant, items[i].request["request_id"]))
        passed = []
        for item in items:
            if (item.request["tenant"], item.request["request_id"]) not in refused:
                passed.append(item)
            else:
                self.take_back(item)
        return passed

    def take_back(self, item: Admissible) -> None:
        """Takes `item` back from the admissions counted by `downstream`: it is not
        forwarded (its quota refused it, it was claimed before, it failed alone).
        Once per item: a wave that fails after some of its items were taken back takes
        back only the rest."""
        if self.admission is None or item.taken_back:
            return
        item.taken_back = True
        if self.release is not None:
            self.release(item.request)
        if self.fair_shares is not None:
            self.fair_shares.withdraw(item.request["tenant"])
