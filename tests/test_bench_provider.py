"""`tidegate bench provider`'s pure parts (bench/provider_summary.py): the fleet file it
writes is one streams/fleet.py accepts, the provider's counts are read from its
gateway's Prometheus text, and a run's figures (lost, doubled, the provider's 429s
against its calls, goodput against R) come out as defined and are judged against the
aims. No broker: the bench itself runs on one (`tidegate bench provider`)."""

from __future__ import annotations

import pytest
import yaml

from bench.fleet_summary import LOST, REJECTED, Outcome
from bench.provider_summary import (
    calls_between,
    doubled,
    format_run,
    provider_fleet,
    run_summary,
    status_codes,
    worker_totals,
)
from streams.config import Settings
from streams.fleet import parse_fleet

METRICS = """# HELP tidegate_gateway_requests_total HTTP chat completions by status code
# TYPE tidegate_gateway_requests_total counter
tidegate_gateway_requests_total{code="200"} 590.0
tidegate_gateway_requests_total{code="429"} 12.0
tidegate_gateway_requests_created{code="200"} 1.7e9
tidegate_gateway_request_seconds_count{code="200"} 590.0
"""


def steady(rate: float, start: float, end: float, status: str = "ok", latency_s: float = 0.5) -> list[Outcome]:
    """Outcomes done at `rate` a second over [start, end]."""
    n = int((end - start) * rate)
    return [Outcome(start + i / rate - latency_s, start + i / rate, status) for i in range(n)]


def test_the_fleet_file_is_a_remote_pool_the_fleet_accepts_with_or_without_rpm() -> None:
    for rpm in (600, None):
        text = provider_fleet("http://127.0.0.1:9999/v1", "KEY_VAR", "echo", 8, rpm, 40)
        fleet = parse_fleet(yaml.safe_load(text), Settings())
        pool = fleet.pools["remote"]
        assert pool.remote is not None and pool.remote.rpm == rpm
        assert pool.remote.api_key_env == "KEY_VAR" and pool.remote.provider_model == "echo"
        assert pool.replicas == 0 and pool.workers_cap_messages == 40 and pool.models == ("chat",)


def test_the_providers_calls_are_its_gateways_chat_completions_by_code() -> None:
    assert status_codes(METRICS) == {"200": 590, "429": 12}
    assert calls_between({"200": 90, "429": 2}, {"200": 590, "429": 12, "504": 0}) == {"200": 500, "429": 10}
    assert calls_between({}, {"200": 3}) == {"200": 3}


def test_doubled_counts_ids_answered_more_than_once() -> None:
    assert doubled({"a": 1, "b": 2, "c": 1, "d": 3}) == 2
    assert doubled({}) == 0


def test_a_run_at_the_limit_meets_the_aims() -> None:
    outcomes = steady(10.0, 0.0, 60.0) + [Outcome(1.0, 1.0, REJECTED)] * 1200 + [Outcome(2.0, 2.2, "queue_full")] * 3
    s = run_summary(outcomes, len(outcomes), (5.0, 60.0), 600, {"200": 600, "429": 6}, {"x": 1}, 10.0)
    assert s["goodput_rps"] == pytest.approx(10.0, rel=0.01) and s["goodput_over_limit"] == pytest.approx(1.0, 0.01)
    assert s["provider_calls"] == 606 and s["provider_429"] == 6 and s["provider_429_share"] == pytest.approx(0.0099)
    assert s["refused"] == 1203 and s["lost"] == 0 and s["doubled"] == 0
    assert s["aims_met"]
    line = format_run("shared", s)
    assert "1.0%" in line and "lost 0" in line and "doubled 0" in line


@pytest.mark.parametrize(
    ("ok_rate", "codes", "answers", "extra", "why"),
    [
        (10.0, {"200": 600, "429": 13}, {}, [], "the provider's 429s at 2.1% of the calls"),
        (9.4, {"200": 600}, {}, [], "goodput at 94% of R"),
        (10.0, {"200": 600}, {"r1": 2}, [], "a request answered twice"),
        (10.0, {"200": 600}, {}, [Outcome(3.0, 33.0, LOST)], "a request never answered"),
    ],
)
def test_a_run_misses_the_aims(
    ok_rate: float, codes: dict[str, int], answers: dict[str, int], extra: list[Outcome], why: str
) -> None:
    outcomes = steady(ok_rate, 0.0, 60.0) + extra
    s = run_summary(outcomes, len(outcomes), (5.0, 60.0), 600, codes, answers, 10.0)
    assert not s["aims_met"], why


def test_goodput_counts_ok_replies_within_their_deadline_in_the_window_and_lost_counts_the_unrecorded() -> None:
    late = steady(5.0, 0.0, 60.0, latency_s=12.0)  # ok, past the 10 s deadline: not goodput
    on_time = steady(5.0, 0.0, 60.0)
    after = steady(50.0, 61.0, 70.0)  # the queue drained after the offered load: outside the window
    outcomes = late + on_time + after
    s = run_summary(outcomes, len(outcomes) + 2, (5.0, 60.0), 600, {"200": 1}, {}, 10.0)
    assert s["goodput_rps"] == pytest.approx(5.0, rel=0.02)
    assert s["lost"] == 2  # sent, never recorded


def test_no_calls_is_no_429_share_and_the_workers_counters_are_summed() -> None:
    s = run_summary([], 0, (5.0, 60.0), 600, {}, {}, 10.0)
    assert s["provider_429_share"] == 0.0 and s["goodput_rps"] == 0.0 and not s["aims_met"]
    totals = worker_totals([{"calls": "3", "rate_limited": "1", "paused_ms": "50"}, {"calls": "4", "ok": "4"}, {}])
    assert totals["calls"] == 7 and totals["rate_limited"] == 1 and totals["ok"] == 4 and totals["paused_ms"] == 50
    assert totals["pauses_joined"] == 0
