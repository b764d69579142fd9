"""The pure parts of `tidegate bench fleet` (bench/fleet.py): the fleet files its cases
run, and the figures made of what its load generator saw.

Rates are the slope of the cumulative count of ok replies over a window (a least-
squares fit), not a count divided by the window: a pool answers a batch at a time
(8 rows every 320 ms at sim:20), and a window whose edges fall mid-batch moves a
count by up to a batch per pool, +-3% on a 15 s window of 25 replies/s; the slope of
a staircase is its rate wherever the edges fall. Capacity and goodput are measured
the same way, so the ratio of the two compares like with like.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from bench.stats import percentile

GOODPUT_TARGET = 0.95  # of the two pools' combined capacity (issue 26, item 7)
LOST = "lost"
REJECTED = "rejected"  # QueueFull before anything was sent: refused, not lost


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request as the load generator saw it (monotonic seconds)."""

    sent_at: float
    done_at: float
    status: str  # a reply status, REJECTED (QueueFull), "unsent" (SendTimeout) or LOST
    model: str = ""
    fallback_from: str | None = None
    fallback_reason: str | None = None
    inference_ms: int = 0  # the reply's batch time: which pool served it, where one model has two

    @property
    def latency_s(self) -> float:
        return self.done_at - self.sent_at


def fleet_text(models: Mapping[str, Mapping[str, Any]], pools: Mapping[str, Mapping[str, Any]]) -> str:
    """A fleet file (streams/fleet.py) of these models and pools, as YAML."""
    return yaml.safe_dump({"models": dict(models), "pools": dict(pools)}, sort_keys=False)


def nominal_rps(step_ms: float, max_batch: int, new_tokens: int) -> float:
    """A `sim:STEP_MS` pool's ceiling: full batches of `max_batch` rows, each waiting
    STEP_MS per decode step for `new_tokens` steps, nothing else costing time."""
    return max_batch / (step_ms * new_tokens / 1000)


def slope_rate(times: Iterable[float], start: float, end: float) -> float:
    """Events per second in [start, end]: the least-squares slope of their cumulative
    count against time; 0.0 with fewer than two."""
    ts = sorted(t for t in times if start <= t <= end)
    n = len(ts)
    if n < 2:
        return 0.0
    mean_t = sum(ts) / n
    mean_i = (n - 1) / 2
    var = sum((t - mean_t) ** 2 for t in ts)
    if var <= 0:
        return 0.0
    return sum((t - mean_t) * (i - mean_i) for i, t in enumerate(ts)) / var


def statuses(outcomes: Iterable[Outcome]) -> dict[str, int]:
    return dict(collections.Counter(o.status for o in outcomes))


def lost(outcomes: Sequence[Outcome], sent: int) -> int:
    """Sent and never answered by deadline + grace, or never recorded at all."""
    return sum(1 for o in outcomes if o.status == LOST) + max(0, sent - len(outcomes))


def good(outcomes: Iterable[Outcome], deadline_s: float) -> list[Outcome]:
    """ok replies that came within their deadline."""
    return [o for o in outcomes if o.status == "ok" and o.latency_s <= deadline_s]


def latency_ms(outcomes: Sequence[Outcome], q: float) -> float:
    return round(percentile([o.latency_s * 1000 for o in outcomes], q), 1)


def reasons(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """Fallbacks by reason (`full`, `circuit_open`)."""
    return dict(collections.Counter(o.fallback_reason or "?" for o in outcomes if o.fallback_from))


def overflow_summary(
    outcomes: Sequence[Outcome],
    sent: int,
    window: tuple[float, float],
    capacities: Mapping[str, float],
    deadline_s: float,
) -> dict[str, Any]:
    """The overflow case: goodput over the steady `window` against the pools' combined
    capacity, the share of it the fallback served, and the requests lost."""
    start, end = window
    served = [o for o in good(outcomes, deadline_s) if start <= o.done_at <= end]
    goodput = slope_rate((o.done_at for o in served), start, end)
    fallback = [o for o in served if o.fallback_from]
    combined = sum(capacities.values())
    gone = lost(outcomes, sent)
    ratio = goodput / combined if combined else 0.0
    return {
        "sent": sent,
        "statuses": statuses(outcomes),
        "goodput_rps": round(goodput, 1),
        "combined_capacity_rps": round(combined, 1),
        "goodput_over_combined": round(ratio, 3),
        "fallback_share": round(len(fallback) / len(served), 3) if served else 0.0,
        "fallback_rps": round(slope_rate((o.done_at for o in fallback), start, end), 1),
        "fallback_reasons": reasons(outcomes),
        "ok_p50_ms": latency_ms(served, 50),
        "ok_p99_ms": latency_ms(served, 99),
        "lost": gone,
        "target_met": ratio >= GOODPUT_TARGET and gone == 0,
    }


def circuit_changes(timeline: Iterable[Mapping[str, Any]], stage: str) -> list[tuple[float, str, str]]:
    """(seen_at, circuit, reason) each time `stage`'s published circuit changed, in order."""
    changes: list[tuple[float, str, str]] = []
    for state in timeline:
        if state.get("stage") != stage:
            continue
        circuit = state.get("circuit") or "closed"
        if not changes or changes[-1][1] != circuit:
            changes.append((float(state["seen_at"]), circuit, state.get("circuit_reason") or ""))
    return changes


def first_seen(changes: Sequence[tuple[float, str, str]], circuit: str, after: float) -> float | None:
    """When `circuit` was first seen at or after `after`, or None."""
    return next((at for at, state, _ in changes if state == circuit and at >= after), None)


def kill_summary(
    outcomes: Sequence[Outcome],
    sent: int,
    changes: Sequence[tuple[float, str, str]],
    marks: Mapping[str, float | None],
    primary_model: str,
) -> dict[str, Any]:
    """The kill case: `marks` has `started` (the load), `killed`, `returned` (the
    workers started again) and `ready` (they said so), monotonic seconds."""
    started, killed, returned = marks["started"], marks["killed"], marks["returned"]
    assert started is not None and killed is not None and returned is not None
    opened = first_seen(changes, "open", killed)
    closed = first_seen(changes, "closed", returned)
    ready = marks.get("ready")
    ok = [o for o in outcomes if o.status == "ok"]
    # requests the primary took after the kill (not passed over): queued in its topic
    queued = [o for o in outcomes if killed <= o.sent_at < returned and o.status != REJECTED and not o.fallback_from]
    queued = [o for o in queued if o.model in ("", primary_model)]
    down_end = closed if closed is not None else returned
    fallback = [o.done_at for o in ok if o.fallback_from]
    outage = [o for o in outcomes if killed <= o.sent_at < down_end]
    gone = lost(outcomes, sent)
    return {
        "sent": sent,
        "statuses": statuses(outcomes),
        "offered_rps": round(len([o for o in outcomes if o.sent_at < killed]) / max(1e-9, killed - started), 1),
        "open_after_kill_s": _round(opened - killed if opened is not None else None),
        "open_reason": next((r for at, s, r in changes if s == "open" and at >= killed), ""),
        "down_s": round(returned - killed, 1),
        "fallback_rps_while_open": round(slope_rate(fallback, opened, returned), 1) if opened else 0.0,
        "fallback_rps_kill_to_close": round(slope_rate(fallback, killed, down_end), 1),
        "ok_share_sent_during_outage": round(sum(o.status == "ok" for o in outage) / len(outage), 3) if outage else 0.0,
        "fallback_reasons": reasons(outcomes),
        "queued_in_primary": len(queued),
        "queued_statuses": statuses(queued),
        "queued_max_wait_s": round(max((o.latency_s for o in queued), default=0.0), 1),
        "close_after_return_s": _round(closed - returned if closed is not None else None),
        "close_after_ready_s": _round(closed - ready if closed is not None and ready is not None else None),
        "circuit": [(round(at - killed, 2), state, reason) for at, state, reason in changes],
        "lost": gone,
        "target_met": opened is not None and closed is not None and gone == 0,
    }


def routing_summary(
    outcomes: Sequence[Outcome], sent: int, window: tuple[float, float], deadline_s: float, slow_batch_ms: float
) -> dict[str, Any]:
    """One routing run: goodput over `window`, the latency of the ok replies to requests
    sent in it, and the share the slow pool served (a batch of `slow_batch_ms` or more:
    the reply names the model, not the pool)."""
    start, end = window
    served = [o for o in good(outcomes, deadline_s) if start <= o.done_at <= end]
    measured = [o for o in outcomes if o.status == "ok" and start <= o.sent_at <= end]
    slow = [o for o in measured if o.inference_ms >= slow_batch_ms]
    return {
        "sent": sent,
        "statuses": statuses(outcomes),
        "goodput_rps": round(slope_rate((o.done_at for o in served), start, end), 1),
        "p50_ms": latency_ms(measured, 50),
        "p99_ms": latency_ms(measured, 99),
        "slow_pool_share": round(len(slow) / len(measured), 3) if measured else 0.0,
        "lost": lost(outcomes, sent),
    }


def _round(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def format_overflow(s: Mapping[str, Any]) -> str:
    return (
        f"overflow: goodput {s['goodput_rps']}/s = {s['goodput_over_combined']:.0%} of the pools' combined "
        f"{s['combined_capacity_rps']}/s (target {GOODPUT_TARGET:.0%}), fallback served {s['fallback_share']:.0%}, "
        f"p99 {s['ok_p99_ms'] / 1000:.2f} s, lost {s['lost']}, statuses {s['statuses']}"
    )


def format_kill(s: Mapping[str, Any]) -> str:
    return (
        f"kill: circuit open {s['open_after_kill_s']} s after the SIGKILL ({s['open_reason'] or 'never'}), "
        f"fallback {s['fallback_rps_while_open']}/s while open (offered {s['offered_rps']}/s), "
        f"closed {s['close_after_return_s']} s after the workers' return; {s['queued_in_primary']} queued in "
        f"the primary {s['queued_statuses']}, lost {s['lost']}"
    )


def format_routing(runs: Mapping[str, Mapping[str, Any]]) -> str:
    parts = [
        f"{mode} goodput {r['goodput_rps']}/s p50 {r['p50_ms'] / 1000:.2f} s p99 {r['p99_ms'] / 1000:.2f} s "
        f"slow {r['slow_pool_share']:.0%} lost {r['lost']}"
        for mode, r in runs.items()
    ]
    return "routing: " + "; ".join(parts)
