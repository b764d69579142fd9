"""A provider's rate-limit headers read as the wait its pool pauses for
(inference/rate_limits.py): retry-after-ms first, then retry-after (seconds or an HTTP
date), then the reset of the spent x-ratelimit limit, each bounded."""

from __future__ import annotations

import email.utils

import pytest

from inference.rate_limits import (
    MAX_PAUSE_S,
    MIN_PAUSE_S,
    exhausted_wait,
    parse_duration,
    parse_retry_after,
    retry_wait,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("1.5s", 1.5),
        ("350us", 350e-6),
        ("350µs", 350e-6),
        ("0s", 0.0),
        ("2", 2.0),
        ("0.25", 0.25),
        (" 7s ", 7.0),
    ],
)
def test_go_durations_and_bare_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1x", "1s2", "-1s", "1 s", "abc", "1s garbage"])
def test_what_is_no_duration_is_none(text: str) -> None:
    assert parse_duration(text) is None


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("107", now) == 107
    assert parse_retry_after("1.5", now) == 1.5
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30, abs=1)
    assert parse_retry_after("tomorrow-ish", now) is None


def test_a_429s_wait_retry_after_ms_first_then_retry_after_then_the_spent_limits_reset() -> None:
    # the openai SDK's order: the precise one wins over the rounded-up seconds
    assert retry_wait({"retry-after-ms": "1500", "retry-after": "2"}) == 1.5
    assert retry_wait({"Retry-After": "107", "x-ratelimit-reset-requests": "9s"}) == 107  # never the shorter one
    # the limit whose remaining count is 0 is the one that refused
    spent_tokens = {
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert retry_wait(spent_tokens) == 360
    spent_requests = {**spent_tokens, "x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "12"}
    assert retry_wait(spent_requests) == 1
    # neither (or both) said spent: the later reset
    assert retry_wait({"x-ratelimit-reset-requests": "20ms", "x-ratelimit-reset-tokens": "3s"}) == 3
    assert retry_wait({"content-type": "application/json"}) is None
    # a malformed header falls through to the next one
    assert retry_wait({"retry-after-ms": "soon", "retry-after": "4"}) == 4


def test_waits_are_bounded() -> None:
    assert retry_wait({"retry-after": "0"}) == MIN_PAUSE_S
    assert retry_wait({"retry-after": "86400"}) == MAX_PAUSE_S  # a daily quota: ask again in ten minutes
    past = email.utils.formatdate(1_000_000_000, usegmt=True)
    assert retry_wait({"retry-after": past}) == MIN_PAUSE_S
    assert retry_wait({"retry-after-ms": "nan", "retry-after": "inf"}) is None


def test_a_success_that_spent_a_limit_pauses_before_the_next_429() -> None:
    assert exhausted_wait({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "850ms"}) == 0.85
    assert exhausted_wait({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "850ms"}) is None
    assert exhausted_wait({}) is None
