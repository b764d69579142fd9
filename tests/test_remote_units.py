"""The remote pool's pieces without a broker: what a provider's answer means for its
call (inference/provider.py), the body sent, and the pace of rpm and tpm at a
worker's share (inference/remote.py)."""

from __future__ import annotations

import httpx
import pytest

from inference.provider import Done, Failed, RateLimited, answered, chat_payload, refused
from inference.remote import Pacer, RemoteRunner, estimate_tokens
from inference.runners import Generation, Prompt
from streams.fleet_remote import RemoteSpec

SPEC = RemoteSpec("http://127.0.0.1:1/v1", "gpt-4o-mini", 4)


def response(status: int, body: object = None, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def test_a_429_is_a_wait_and_says_which_header_gave_it() -> None:
    event = refused(
        7, response(429, {"error": {"message": "slow down"}}, **{"retry-after-ms": "1500", "retry-after": "2"})
    )
    assert isinstance(event, RateLimited) and event.call == 7 and event.wait_s == 1.5
    assert event.why == "429 retry-after-ms: 1500, retry-after: 2"
    bare = refused(7, response(429, {}))
    assert isinstance(bare, RateLimited) and bare.wait_s is None and bare.why == "429 without a wait"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, "error"),
        (502, "error"),
        (503, "error"),
        (401, "error"),
        (404, "error"),
        (400, "invalid"),
        (413, "invalid"),
        (422, "invalid"),
    ],
)
def test_other_statuses_are_errors_for_the_breaker_or_the_requests_own_fault(status: int, kind: str) -> None:
    event = refused(1, response(status, {"error": {"message": "m" * 1000, "type": "x"}}))
    assert isinstance(event, Failed) and event.status == kind
    assert event.why.startswith(f"the provider answered {status}: mmm") and len(event.why) < 400


def test_a_non_json_error_body_is_kept_short() -> None:
    event = refused(1, httpx.Response(502, text="<html>bad gateway</html>" * 100))
    assert isinstance(event, Failed) and event.status == "error" and "bad gateway" in event.why and len(event.why) < 400


def test_a_completion_gives_its_text_usage_and_a_spent_limit() -> None:
    body = {
        "choices": [{"message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2},
    }
    done = answered(3, body, httpx.Headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}))
    assert done == Done(3, "hi", 9, 2, 2.0)
    assert answered(3, {"choices": [{"message": {"content": None}}]}, httpx.Headers()) == Done(3, "", None, None, None)


def test_the_body_carries_the_envelopes_messages_and_limits() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    plain = chat_payload(SPEC, messages, 16, 0.7, stream=False)
    assert plain == {
        "model": "gpt-4o-mini",
        "messages": messages,
        "max_tokens": 16,
        "temperature": 0.7,
        "stream": False,
    }
    streamed = chat_payload(SPEC, messages, 16, 0.0, stream=True)
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}


def test_rpm_is_paced_at_this_workers_share() -> None:
    pacer = Pacer(rpm=120, tpm=None)  # 2 a second for the pool
    assert pacer.wait_s(10, share=2, now=0.0) == 0  # a bucket starts full: one call (the share's second)
    pacer.spend(10)
    assert pacer.wait_s(10, share=2, now=0.0) == pytest.approx(1.0)  # 1 a second each of two workers
    assert pacer.wait_s(10, share=2, now=1.0) == 0
    assert Pacer(None, None).wait_s(10**6, share=1, now=0.0) == 0  # no limits: no pace


def test_a_worker_starts_with_room_for_one_call_not_a_burst_and_fills_while_idle() -> None:
    """A fresh worker whose peers keep the provider at its limit (a restart, a scale-out,
    `tidegate bench provider`'s start) sends one call, then its pace: a bucket that
    started full sent BURST_S of its share at once, and every one but the first met a
    429 (the only 429s of a pool paced to its provider's limit)."""
    pacer = Pacer(rpm=600, tpm=None)  # 10 a second for the pool, 5 for each of two workers
    assert pacer.wait_s(10, share=2, now=0.0) == 0
    pacer.spend(10)
    assert pacer.wait_s(10, share=2, now=0.0) == pytest.approx(0.2)  # the second waits its turn
    assert pacer.wait_s(10, share=2, now=0.2) == 0
    pacer.spend(10)
    idle = 5.0  # the pool idle for a while: its bucket fills to BURST_S of its share, as the provider's does
    for _ in range(5):
        assert pacer.wait_s(10, share=2, now=idle) == 0
        pacer.spend(10)
    assert pacer.wait_s(10, share=2, now=idle) > 0


def test_a_call_larger_than_the_tpm_bucket_goes_when_it_is_full_and_leaves_a_debt() -> None:
    pacer = Pacer(rpm=None, tpm=600)  # 10 tokens a second
    assert pacer.wait_s(50, share=1, now=0.0) == 0  # larger than the bucket (10): it is full, so it goes
    pacer.spend(50)
    assert pacer.wait_s(5, share=1, now=0.0) == pytest.approx(4.5)  # 40 in debt, then 5 needed
    assert pacer.wait_s(5, share=1, now=4.5) == 0


def test_the_runner_encodes_nothing_and_counts_the_providers_tokens() -> None:
    runner = RemoteRunner(SPEC)
    prompt = Prompt([{"role": "user", "content": "x" * 400}], 8)
    assert runner.name == "gpt-4o-mini" and runner.encode(prompt) == ([], 0)
    assert runner.count_turn_tokens(Generation("ok", 5, 3)) > 3
    assert 100 <= estimate_tokens(prompt) <= 110


def test_a_stream_cut_short_without_a_finish_reason_is_an_error_not_an_answer() -> None:
    """llama-cpp-python's server (its default `interrupt_requests`) ends a stream with an
    empty [DONE] and no finish_reason when another request waits; a connection that
    closes early reads the same. Before, that was a whole answer: `ok` with the text cut
    short (or empty)."""
    import asyncio
    import queue
    import types

    import httpx

    from inference.provider import Done, Failed, Provider

    def sse(*chunks: str) -> httpx.Response:
        body = "".join(f"data: {c}\n\n" for c in chunks).encode()
        return httpx.Response(200, stream=httpx.ByteStream(body))

    piece = '{"choices": [{"index": 0, "delta": {"content": "hel"}, "finish_reason": null}]}'
    last = '{"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}'
    holder = types.SimpleNamespace(events=queue.Queue())
    cut = asyncio.run(Provider._streamed(holder, 1, sse(piece, "[DONE]")))  # type: ignore[arg-type]
    assert isinstance(cut, Failed) and cut.status == "error" and "finish_reason" in cut.why
    whole = asyncio.run(Provider._streamed(holder, 2, sse(piece, last, "[DONE]")))  # type: ignore[arg-type]
    assert isinstance(whole, Done) and whole.text == "hello"
