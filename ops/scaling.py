"""How many members a stage's consumer group needs, and why, in words.

A group drains `per_member` messages a second per member (its measured drain rate
over its members). To keep up it needs arrival / per_member members; to also
clear its backlog within `target_s` it needs (arrival + lag / target_s) /
per_member. A group cannot use more members than its topic has partitions: past
that the advice is to add partitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def drain_time_s(lag: int, drain_rate: float, arrival_rate: float) -> float:
    """Seconds until the backlog is gone: lag over (drain rate - arrival rate); 0 with
    no lag, -1 when it does not drain (arrivals keep up with the drain)."""
    if lag == 0:
        return 0.0
    net = drain_rate - arrival_rate
    return lag / net if net > 0 else -1.0


@dataclass(frozen=True, slots=True)
class Advice:
    stage: str
    current: int
    recommended: int
    reason: str

    @property
    def change(self) -> int:
        return self.recommended - self.current


def advise(
    stage: str,
    *,
    members: int,
    partitions: int,
    arrival_rate: float,
    drain_rate: float,
    lag: int,
    target_s: float,
    min_members: int = 1,
) -> Advice:
    """Members for `stage`; `drain_rate` is what the whole group commits per second
    while it has work, `arrival_rate` what arrives per second."""
    current = max(1, members)
    if drain_rate <= 0:
        if lag > 0 or arrival_rate > 0:
            return Advice(stage, members, max(min_members, members), "no drain rate measured yet: keep the group")
        return Advice(stage, members, max(min_members, members), "idle: nothing arrives, nothing waits")
    per_member = drain_rate / current
    wanted = (arrival_rate + lag / target_s) / per_member
    needed = max(min_members, math.ceil(wanted - 1e-9))
    demand = f"{arrival_rate:.1f}/s arriving, lag {lag} to clear in {target_s:.0f}s, {per_member:.1f}/s per member"
    if needed > partitions:
        return Advice(
            stage,
            members,
            partitions,
            f"{demand}: {needed} members needed, capped at {partitions} partitions: add partitions",
        )
    if needed > members:
        return Advice(stage, members, needed, f"{demand}: scale out to {needed}")
    if needed < members:
        return Advice(stage, members, needed, f"{demand}: {needed} suffice, scale in")
    return Advice(stage, members, members, f"{demand}: {members} keep up")
