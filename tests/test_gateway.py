"""The OpenAI-compatible gateway, driven by the official openai SDK (sync and async):
answers, OpenAI-shaped errors, and 429s whose retry-after-ms the SDK honours."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from schemas import get_codec
from streams import Client, RequestTooLarge, Settings
from streams.kafka import admin_client
from streams.lag import WORKERS
from streams.pressure_feed import PressureListener
from tests.conftest import Pipeline
from tests.helpers import GatewayProcess as Gateway
from tests.helpers import TopicReader, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.same_on_any_broker]


@pytest.fixture(scope="module")
def served(pipeline_factory: Callable[..., Pipeline]) -> Iterator[tuple[Pipeline, Gateway]]:
    pipeline = pipeline_factory(model="echo", workers_cap_messages=10_000)
    gateway = Gateway(pipeline.settings)
    yield pipeline, gateway
    gateway.stop()


def test_the_openai_sdk_gets_a_completion_sync_and_async(served: tuple[Pipeline, Gateway]) -> None:
    _, gateway = served
    client = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.key)
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hello through http"}], max_tokens=16
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "hello through http"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    for header in ("x-tidegate-queue-ms", "x-tidegate-context-ms", "x-tidegate-inference-ms"):
        assert raw.headers[header].isdigit(), header

    async def concurrently() -> list[str]:
        async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=gateway.key) as aclient:
            done = await asyncio.gather(
                *(
                    aclient.chat.completions.create(
                        model="echo", messages=[{"role": "user", "content": f"async {i}"}], max_tokens=8
                    )
                    for i in range(20)
                )
            )
        return [c.choices[0].message.content or "" for c in done]

    assert asyncio.run(concurrently()) == [f"async {i}" for i in range(20)]
    models = client.models.list()
    assert [m.id for m in models.data] == ["echo"]
    assert client.models.retrieve("echo").id == "echo"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-5")
    with pytest.raises(openai.NotFoundError, match="not served here"):  # OpenAI's error shape, not plain text
        client.completions.create(model="echo", prompt="legacy completions")


def test_errors_come_as_the_sdk_expects_them(served: tuple[Pipeline, Gateway]) -> None:
    _, gateway = served
    wrong = openai.OpenAI(base_url=gateway.base_url, api_key="tg-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    client = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_new_tokens"):
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="echo", messages=[{"role": "wizard", "content": "x"}])  # type: ignore[list-item]
    probe = httpx.Client(base_url=gateway.base_url.removesuffix("/v1"))
    assert probe.get("/healthz").status_code == 200 and probe.get("/readyz").status_code == 200
    exported = probe.get("/metrics").text
    assert "tidegate_gateway_requests_total" in exported
    # timed to the microsecond: the event loop's clock (uvloop's) counts whole milliseconds
    took = float(re.findall(r'tidegate_gateway_request_seconds_sum\{code="400"\} (\S+)', exported)[0])
    assert took > 0 and round(took * 1000, 6) % 1 != 0, took
    bad_json = probe.post(
        "/v1/chat/completions", content=b"{not json", headers={"authorization": f"Bearer {gateway.key}"}
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"


def test_oversized_requests_are_refused_up_front_and_a_huge_body_is_never_read_whole(
    served: tuple[Pipeline, Gateway],
) -> None:
    """Over the prompt limit: 400 saying so, before anything is sent. Over what any
    request could need (declared, or streamed in without a length): 413 at once."""
    pipeline, gateway = served
    headers = {"authorization": f"Bearer {gateway.key}", "content-type": "application/json"}
    probe = httpx.Client(base_url=gateway.base_url, headers=headers, timeout=30)
    limit = pipeline.settings.max_prompt_chars
    over = {"model": "echo", "messages": [{"role": "user", "content": "x" * (limit + 1)}], "max_tokens": 8}
    answer = probe.post("/chat/completions", json=over)
    assert answer.status_code == 400 and "over the limit" in answer.json()["error"]["message"], answer.text
    huge = {**over, "messages": [{"role": "user", "content": "y" * 3_000_000}]}
    answer = probe.post("/chat/completions", json=huge)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large", answer.text

    def endless() -> Iterator[bytes]:  # chunked, no content-length: cut off past the limit
        yield b'{"model": "echo", "messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"z" * 65_536

    answer = probe.post("/chat/completions", content=endless())
    assert answer.status_code == 413, answer.text
    assert probe.post("/chat/completions", json={**over, "messages": [{"role": "user", "content": "ok"}]}).is_success


def test_the_client_says_a_request_is_too_large_for_the_broker(served: tuple[Pipeline, Gateway]) -> None:
    pipeline, _ = served

    async def oversized() -> None:
        async with Client(settings=pipeline.settings) as client:
            await client.submit([{"role": "user", "content": "w" * 2_000_000}], "too-large")

    with pytest.raises(RequestTooLarge, match="bytes refused by the broker"):
        asyncio.run(oversized())


def test_a_full_pipeline_answers_429_with_a_retry_time_the_sdk_waits_out(
    pipeline_factory: Callable[..., Pipeline],
) -> None:
    """No worker, the workers' cap at 5 and filled: the gateway answers 429 queue_full
    with retry-after-ms (1..120000) and retry-after; the SDK waits that long before it
    asks again. Then a worker starts, and a patient SDK call is answered."""
    pipeline = pipeline_factory(("monitor", "processor"), model="echo", workers_cap_messages=5)
    settings = pipeline.settings

    watch = PressureListener(settings)
    watch.start()

    def workers_lag() -> int:
        return int((watch.board.state(WORKERS) or {}).get("lag", 0))

    async def fill() -> None:
        # the gateway key's own tenant: another tenant under its fair share would be let in
        # up to the high-priority line (processors/fairness.py). Sent until the monitor has
        # published the filled stage, not a fixed 8: the processors' board may refuse a few
        # near the cap (a forward counted both in a state and as its own admission for
        # FORWARD_TRANSIT_MS), and then 8 sent left the lag below 5 for good.
        async with Client(settings=settings.model_copy(update={"backpressure": False}), tenant="acme") as client:
            deadline = time.monotonic() + 30
            for i in range(40):
                if workers_lag() >= 5:
                    return
                await client.submit([{"role": "user", "content": f"fill {i}"}], f"fill-{i}", deadline_s=120)
                if i >= 7:  # past the cap's worth: give the monitor a moment to publish
                    await asyncio.sleep(0.2)
            while workers_lag() < 5:
                assert time.monotonic() < deadline, "timed out after 30s waiting for the workers' lag at its cap"
                await asyncio.sleep(0.05)

    try:  # the monitor has published the filled stage: the gateway's client refuses at once
        asyncio.run(fill())
    finally:
        watch.close()
    gateway = Gateway(settings)
    try:
        seen: list[tuple[float, str, int, str | None]] = []  # (at, event, status, retry-after-ms)

        def on_request(request: httpx.Request) -> None:
            seen.append((time.monotonic(), "request", 0, None))

        def on_response(response: httpx.Response) -> None:
            seen.append((time.monotonic(), "response", response.status_code, response.headers.get("retry-after-ms")))

        hooks = {"request": [on_request], "response": [on_response]}
        client = openai.OpenAI(
            base_url=gateway.base_url, api_key=gateway.key, max_retries=2, http_client=httpx.Client(event_hooks=hooks)
        )

        def full() -> bool:
            try:
                client.with_options(max_retries=0).chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": "probe"}], max_tokens=4
                )
            except openai.RateLimitError:
                return True
            return False

        wait_for(full, 30, "a 429 from the gateway", interval_s=0.2)
        seen.clear()
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        response = refused.value.response
        assert refused.value.code == "queue_full"
        ms = int(response.headers["retry-after-ms"])
        assert 0 < ms <= 120_000 and int(response.headers["retry-after"]) == -(-ms // 1000)
        responses = [s for s in seen if s[1] == "response"]
        requests = [s for s in seen if s[1] == "request"]
        assert len(requests) == 3 and all(s[2] == 429 and s[3] for s in responses)  # 1 try + 2 retries
        for answered, asked_again in zip(responses, requests[1:], strict=False):
            assert asked_again[0] - answered[0] >= 0.9 * int(answered[3] or 0) / 1000  # the hint was waited out
        pipeline.start(("worker",))
        patient = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.key, max_retries=20)
        done = patient.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "patient"}], max_tokens=8
        )
        assert done.choices[0].message.content == "patient"
    finally:
        gateway.stop()


def test_a_stream_through_the_sdk_ends_with_usage_and_done(served: tuple[Pipeline, Gateway]) -> None:
    _, gateway = served
    client = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.key)
    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "streamed words"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed words"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
    raw = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "raw"}], "stream": True},
        headers={"authorization": f"Bearer {gateway.key}"},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


@pytest.mark.timeout(300)
def test_tokens_stream_as_they_are_generated(pipeline_factory: Callable[..., Pipeline]) -> None:
    """A real model with continuous batching: the text arrives in several chunks, in
    order, that add up to the reply's text, over Kafka (client.stream) and over HTTP."""
    # a chunk every decode step: the tiny model decodes 24 tokens in tens of ms
    pipeline = pipeline_factory(("processor", "worker"), model="tiny", torch_threads=1, stream_interval_ms=0)

    async def over_kafka() -> list:
        async with Client(settings=pipeline.settings) as client:
            got = []
            async for chunk in client.stream([{"role": "user", "content": "tell me"}], "tiny-s", max_new_tokens=24):
                got.append((time.monotonic(), chunk))
            return got

    got = asyncio.run(over_kafka())
    final = got[-1][1].reply
    assert final is not None and final.status == "ok" and final.tokens_out > 4
    assert "".join(c.text for _, c in got) == final.text
    assert len(got) >= 3, [c.text for _, c in got]  # not one piece at the end
    assert [c.index for _, c in got] == sorted(c.index for _, c in got)
    gateway = Gateway(pipeline.settings)
    try:
        client = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.key)
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "tell me"}], max_tokens=24, stream=True
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 3
    finally:
        gateway.stop()


def _replies_of(settings: Settings, tenant: str) -> TopicReader:
    """A reader of the gateway's reply topic for `tenant` (its client's own)."""
    prefix = settings.topics.tenant_replies(tenant)
    admin = admin_client(settings)
    topic = wait_for(
        lambda: next((t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)), None),
        30,
        "the gateway's reply topic",
    )
    return TopicReader(settings, topic)


@pytest.mark.timeout(300)
def test_a_caller_that_goes_away_cancels_its_request(pipeline_factory: Callable[..., Pipeline]) -> None:
    """Queued: a request whose HTTP caller hung up is answered `expired` (cancelled)
    without reaching the model. Generating: a streamed request whose caller hung up
    after its first chunk leaves the batch long before its max_tokens."""
    pipeline = pipeline_factory(("processor", "worker"), model="tiny", torch_threads=1, stream_interval_ms=0)
    settings = pipeline.settings
    gateway = Gateway(settings)
    headers = {"authorization": f"Bearer {gateway.key}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on and on"}], "max_tokens": 1000}
    try:
        httpx.post(f"{gateway.base_url}/chat/completions", json={**body, "max_tokens": 4}, headers=headers)
        replies = _replies_of(settings, gateway.tenant)
        # generating: hang up after the first chunk
        with httpx.stream(
            "POST", f"{gateway.base_url}/chat/completions", json={**body, "stream": True}, headers=headers
        ) as s:
            for line in s.iter_lines():
                if '"content"' in line and '"content":""' not in line:
                    break

        # queued: the worker is held (SIGSTOP) while the caller gives up
        worker = pipeline.pids["worker"]
        os.kill(worker, signal.SIGSTOP)
        try:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{gateway.base_url}/chat/completions", json=body, headers=headers, timeout=0.5)
            metrics = f"{gateway.base_url.removesuffix('/v1')}/metrics"
            wait_for(
                lambda: "tidegate_gateway_cancelled_total 2.0" in httpx.get(metrics).text,
                10,
                "the gateway to cancel both abandoned requests",
            )
        finally:
            os.kill(worker, signal.SIGCONT)

        def cancelled() -> list[dict]:
            found = [get_codec().decode(m.value()) for m in replies.poll()]
            replied = [r for name, r in found if name == "InferenceReply"]  # not the chunks
            return [r for r in replied if r["status"] == "expired" and "cancelled" in (r["error"] or "")]

        gone = wait_for(lambda: len(cancelled()) >= 2 and cancelled(), 60, "both cancellations answered")
        errors = sorted(r["error"] for r in gone)
        assert any("before inference" in e for e in errors), errors
        after = [r for r in gone if r["error"].endswith(" tokens")]  # "... after N tokens"
        assert after and after[0]["tokens_out"] == 0 and int(after[0]["error"].split()[-2]) < 1000, errors
        replies.close()
    finally:
        gateway.stop()
