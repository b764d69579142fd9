"""The pure parts of `tidegate bench provider` (bench/provider.py): the fleet file of
its remote pool, the provider's counters read from its gateway's Prometheus text, and
one run's figures against the aims of issue 27, item 5.

A run's figures:

- lost: sent and never answered by its deadline plus the client's grace (a request
  refused before it was sent, QueueFull, is refused, not lost; bench/fleet_summary.py);
- doubled: request ids with more than one reply on the client's reply topic;
- the provider's 429s against the calls it was sent (at the provider's gateway: every
  call, the 429s among them), aim under RATE_LIMITED_AIM;
- goodput: ok replies within their deadline per second (the slope of their count over
  the steady window, bench/fleet_summary.py `slope_rate`) against the provider's R per
  minute, aim at least GOODPUT_AIM.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.fleet_summary import REJECTED, Outcome, fleet_text, good, latency_ms, lost, slope_rate, statuses

RATE_LIMITED_AIM = 0.02  # the provider's 429s over the calls made: under 2%
GOODPUT_AIM = 0.95  # ok replies/s over the provider's R per minute / 60: at least 95%
GATEWAY_REQUESTS = "tidegate_gateway_requests_total"  # gateway/app.py, by status code


def provider_fleet(
    base_url: str, key_env: str, provider_model: str, max_in_flight: int, rpm: int | None, cap_messages: int
) -> str:
    """One model, `chat`, served by one remote pool (engine: openai) in front of the
    provider at `base_url`; its workers are started by the bench (replicas: 0), so each
    run starts them with its own settings. `rpm` None: the pool knows no limit and
    learns it from the provider's 429s alone."""
    pool: dict[str, Any] = {
        "engine": "openai",
        "base_url": base_url,
        "api_key_env": key_env,
        "provider_model": provider_model,
        "max_in_flight": max_in_flight,
        "models": ["chat"],
        "partitions": 4,
        "replicas": 0,
        "workers_cap_messages": cap_messages,
    }
    if rpm is not None:
        pool["rpm"] = rpm
    return fleet_text({"chat": {"token_budget": 512}}, {"remote": pool})


def status_codes(metrics_text: str, name: str = GATEWAY_REQUESTS) -> dict[str, int]:
    """`name{code="..."} N` lines of a Prometheus text, summed per code."""
    codes: collections.Counter[str] = collections.Counter()
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, _, value = line.rpartition(" ")
        code = labels.partition('code="')[2].partition('"')[0]
        codes[code] += int(float(value))
    return dict(codes)


def calls_between(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """The calls the provider answered between two readings, per status code."""
    return {code: n - before.get(code, 0) for code, n in after.items() if n - before.get(code, 0) > 0}


def doubled(replies_per_id: Mapping[str, int]) -> int:
    """Request ids answered more than once."""
    return sum(1 for n in replies_per_id.values() if n > 1)


def run_summary(
    outcomes: Sequence[Outcome],
    sent: int,
    window: tuple[float, float],
    rpm: int,
    provider_calls: Mapping[str, int],
    replies_per_id: Mapping[str, int],
    deadline_s: float,
) -> dict[str, Any]:
    """One run's figures and whether they meet the aims; `provider_calls`: the calls
    the provider answered during it, per HTTP status code."""
    start, end = window
    served = [o for o in good(outcomes, deadline_s) if start <= o.done_at <= end]
    goodput = slope_rate((o.done_at for o in served), start, end)
    limit_rps = rpm / 60
    calls = sum(provider_calls.values())
    rate_limited = provider_calls.get("429", 0)
    share = rate_limited / calls if calls else 0.0
    ratio = goodput / limit_rps
    gone, twice = lost(outcomes, sent), doubled(replies_per_id)
    counted = statuses(outcomes)
    return {
        "sent": sent,
        "statuses": counted,
        "refused": counted.get(REJECTED, 0) + counted.get("queue_full", 0),
        "lost": gone,
        "doubled": twice,
        "provider_calls": calls,
        "provider_codes": dict(provider_calls),
        "provider_429": rate_limited,
        "provider_429_share": round(share, 4),
        "goodput_rps": round(goodput, 2),
        "limit_rps": round(limit_rps, 2),
        "goodput_over_limit": round(ratio, 3),
        "ok_p50_ms": latency_ms(served, 50),
        "ok_p99_ms": latency_ms(served, 99),
        "aims_met": gone == 0 and twice == 0 and share < RATE_LIMITED_AIM and ratio >= GOODPUT_AIM,
    }


def worker_totals(stats: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """The remote workers' counters (inference/remote.py RemoteStats), summed."""
    totals: collections.Counter[str] = collections.Counter()
    keys = ("calls", "ok", "rate_limited", "errors", "pauses_own", "pauses_joined", "paused_ms")
    for one in stats:
        for key in keys:
            totals[key] += int(float(one.get(key, 0) or 0))
    return {key: totals[key] for key in keys}


def format_run(mode: str, s: Mapping[str, Any]) -> str:
    return (
        f"{mode}: goodput {s['goodput_rps']}/s = {s['goodput_over_limit']:.0%} of R {s['limit_rps']}/s "
        f"(aim {GOODPUT_AIM:.0%}), the provider's 429s {s['provider_429']}/{s['provider_calls']} calls = "
        f"{s['provider_429_share']:.1%} (aim < {RATE_LIMITED_AIM:.0%}), lost {s['lost']}, doubled {s['doubled']}, "
        f"refused {s['refused']} of {s['sent']}, ok p99 {s['ok_p99_ms'] / 1000:.2f} s"
    )
