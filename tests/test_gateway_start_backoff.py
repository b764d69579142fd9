"""A gateway client's start that fails leaves no reply topic, and is not tried again
on every request (issue 25, item 8, found in review).

`Client.start` creates its uniquely named reply topic before its reply reader
starts; a later step failing left the topic, and the gateway tried the start again
on each request, one at a time under one lock: one topic more per request, and
requests queued behind the lock for seconds each. The fault: `reply.no_leader`
(streams/reply_reader.py), the broker refusing the watermarks of a reply topic
created a moment ago, armed as `reply.no_leader@1+` so every start fails.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from streams import Settings
from streams.kafka import admin_client
from tests.conftest import SettingsFactory
from tests.helpers import GatewayProcess, wait_for

pytestmark = pytest.mark.same_on_any_broker

FAULT = "reply.no_leader"
BURST = 4  # requests at once when a start is tried
AT_ONCE_S = 0.5  # a request answered without a start tried: no broker round trip


def reply_topics(settings: Settings, tenant: str) -> list[str]:
    """The tenant's client reply topics on the broker."""
    prefix = f"{settings.topics.replies}.{tenant}."
    return sorted(t for t in admin_client(settings).list_topics(timeout=10).topics if t.startswith(prefix))


def start_failures(http: httpx.Client, gateway: GatewayProcess) -> float:
    text = http.get(f"{gateway.base_url.removesuffix('/v1')}/metrics").text
    found = re.search(r"^tidegate_gateway_client_start_failures_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def chat(http: httpx.Client, gateway: GatewayProcess, stream: bool = False) -> tuple[httpx.Response, float]:
    """A chat completion and the seconds it took to be answered."""
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    started = time.monotonic()
    answer = http.post(f"{gateway.base_url}/chat/completions", json=body, timeout=60)
    return answer, time.monotonic() - started


def assert_unavailable(answer: httpx.Response, most_ms: int) -> int:
    """A 503 `unavailable` in OpenAI's shape with a retry time of at most `most_ms`; that time."""
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "unavailable", answer.text
    retry_ms = int(answer.headers.get("retry-after-ms", "0"))
    assert 0 < retry_ms <= most_ms, answer.headers
    assert answer.headers["retry-after"] == str(-(-retry_ms // 1000))
    return retry_ms


@pytest.mark.timeout(180)
def test_failed_client_starts_leave_no_reply_topic_and_their_backoff_is_answered_at_once(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_factory()
    monkeypatch.setenv("TIDEGATE_FAULTS", f"{FAULT}@1+")
    gateway = GatewayProcess(settings)
    try:
        with httpx.Client(headers={"authorization": f"Bearer {gateway.key}"}) as http:
            for round_, window_ms in enumerate((1000, 2000), start=1):
                # a start is tried and fails; requests that came meanwhile (behind the
                # start's lock) are answered as it fails, with no start of their own
                with ThreadPoolExecutor(BURST) as pool:
                    burst = list(pool.map(lambda stream: chat(http, gateway, stream)[0], [False, True] * (BURST // 2)))
                retry_ms = min(assert_unavailable(answer, window_ms) for answer in burst)
                window_ends = time.monotonic() + retry_ms / 1000
                # in the backoff window: answered at once, no start tried
                for stream in (False, True, False):
                    answer, took_s = chat(http, gateway, stream)
                    assert_unavailable(answer, retry_ms)
                    assert took_s < AT_ONCE_S, f"answered in {took_s:.2f}s: a start was tried"
                assert time.monotonic() < window_ends, "the window ended before its requests"
                assert start_failures(http, gateway) == round_
                # the failed start's reply topic is deleted again
                wait_for(lambda: not reply_topics(settings, gateway.tenant), 10, "no reply topic of the tenant")
                wait_for(lambda end=window_ends: time.monotonic() > end, 35, "the backoff window's end")
        assert reply_topics(settings, gateway.tenant) == []
    finally:
        gateway.stop()
