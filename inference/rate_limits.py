"""A provider's rate-limit headers, read as how long its pool must wait.

OpenAI-compatible servers say how long to wait in several ways, and the gateways in
front of them each read a different subset (LiteLLM's cooldowns have slept 9 s where
a `Retry-After` asked 107 s). On a 429 the wait is, first found:

- `retry-after-ms`: milliseconds (OpenAI's SDKs read it first; tidegate's gateway sends it);
- `retry-after`: seconds, or an HTTP date (RFC 9110);
- `x-ratelimit-reset-requests` / `-tokens`: Go durations (`1s`, `6m0s`, `20ms`,
  `1h2m3.5s`), when the limit runs out again. Of the two, the reset of a limit whose
  `x-ratelimit-remaining-*` is 0 (the one that refused), the later where both or
  neither say so.

A successful answer whose `x-ratelimit-remaining-requests` or `-tokens` is 0 says the
next call would be refused: `exhausted_wait` is the reset of that limit, so the pool
pauses before it is refused rather than after.

Every wait is bounded to [MIN_PAUSE_S, MAX_PAUSE_S]: a header of hours (a daily
quota), or garbage, pauses the pool ten minutes, then one call asks again.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping

MIN_PAUSE_S = 0.05
MAX_PAUSE_S = 600.0
LIMITS = ("requests", "tokens")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|μs|ns|h|m|s)")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(text: str) -> float | None:
    """Seconds in a Go duration (`6m0s`, `1.5s`, `20ms`) or a bare number of seconds;
    None when it is neither."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def parse_retry_after(text: str, now: float | None = None) -> float | None:
    """Seconds a `retry-after` asks for: delta-seconds or an HTTP date; None if neither."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return when.timestamp() - (time.time() if now is None else now)


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _reset(headers: dict[str, str], exhausted_only: bool) -> float | None:
    """The later reset among the limits (those at 0 remaining, where `exhausted_only`)."""
    resets: dict[str, float] = {}
    spent: set[str] = set()
    for limit in LIMITS:
        raw = headers.get(f"x-ratelimit-reset-{limit}")
        seconds = parse_duration(raw) if raw is not None else None
        if seconds is not None:
            resets[limit] = seconds
        if headers.get(f"x-ratelimit-remaining-{limit}", "").strip() == "0":
            spent.add(limit)
    chosen = [s for limit, s in resets.items() if limit in spent]
    if not chosen and not exhausted_only:
        chosen = list(resets.values())
    return max(chosen) if chosen else None


def bounded(seconds: float) -> float:
    return min(MAX_PAUSE_S, max(MIN_PAUSE_S, seconds))


def retry_wait(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds a 429's headers ask the pool to wait (bounded), or None where none says."""
    found = _lower(headers)
    candidates: list[float | None] = []
    if "retry-after-ms" in found:
        ms = found["retry-after-ms"].strip()
        candidates.append(float(ms) / 1000 if _NUMBER.fullmatch(ms) else None)
    if "retry-after" in found:
        candidates.append(parse_retry_after(found["retry-after"], now))
    candidates.append(_reset(found, exhausted_only=False))
    for seconds in candidates:
        if seconds is not None and math.isfinite(seconds):
            return bounded(seconds)
    return None


def exhausted_wait(headers: Mapping[str, str]) -> float | None:
    """After a successful call: the reset of a limit the provider says is spent
    (`x-ratelimit-remaining-*: 0`), bounded; None while it has room."""
    seconds = _reset(_lower(headers), exhausted_only=True)
    return bounded(seconds) if seconds is not None and math.isfinite(seconds) and seconds > 0 else None
