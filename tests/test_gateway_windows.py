"""Issue 25, items 7 and 8, at the gateway: a streamed caller that hangs up before
its first chunk cancels its request; a client that fails to start leaks nothing and
is answered in OpenAI's error shape, not Starlette's plain-text 500."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.app import sse_events
from schemas import get_codec
from streams import Reply, Settings
from streams.reply import Chunk
from tests.conftest import Pipeline
from tests.helpers import GatewayProcess as Gateway
from tests.helpers import wait_for
from tests.test_gateway import _replies_of

pytestmark = pytest.mark.same_on_any_broker


def librdkafka_threads(pid: int) -> list[str]:
    """The names of a process's librdkafka threads (`rdk:main`, `rdk:broker...`): each
    producer, consumer or admin client it has not closed keeps a few."""
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{task}/comm").read_text().strip())
        except FileNotFoundError:
            continue  # the thread ended while we looked
    return [n for n in names if n.startswith("rdk:")]


@pytest.fixture
def not_a_broker() -> Iterator[int]:
    """A loopback port that accepts connections and closes them at once: the broker's
    address answers a TCP check, but no Kafka client gets anywhere."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


@pytest.mark.timeout(120)
def test_a_client_that_fails_to_start_is_closed_and_answered_in_openai_shape(not_a_broker: int) -> None:
    settings = Settings(bootstrap=f"127.0.0.1:{not_a_broker}", topic_prefix=f"t{uuid.uuid4().hex[:8]}.")
    gateway = Gateway(settings)
    try:
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {gateway.key}"}
        for stream in (False, True):
            answer = httpx.post(
                f"{gateway.base_url}/chat/completions", json={**body, "stream": stream}, headers=headers, timeout=60
            )
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert error["code"] == "unavailable" and error["type"] == "server_error"
            assert "Kafka client" in error["message"], error
        # what the failed starts opened (a producer, a consumer each) is closed
        wait_for(lambda: not librdkafka_threads(gateway.proc.pid), 20, "the gateway's librdkafka threads to end")
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def served(pipeline_factory: Callable[..., Pipeline]) -> Iterator[tuple[Pipeline, Gateway]]:
    pipeline = pipeline_factory(("processor", "worker"), model="echo", workers_cap_messages=10_000)
    gateway = Gateway(pipeline.settings)
    yield pipeline, gateway
    gateway.stop()


@pytest.mark.timeout(180)
def test_a_streamed_caller_that_hangs_up_before_its_first_chunk_cancels_its_request(
    served: tuple[Pipeline, Gateway],
) -> None:
    """The worker is held (SIGSTOP) so no chunk can come; the streamed caller gives
    up. Before, the gateway noticed only once a first chunk came (the model had run
    by then, or the whole reply was that first chunk)."""
    pipeline, gateway = served
    headers = {"authorization": f"Bearer {gateway.key}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": "never mind"}], "stream": True}
    httpx.post(f"{gateway.base_url}/chat/completions", json={**body, "stream": False}, headers=headers, timeout=60)
    replies = _replies_of(pipeline.settings, gateway.tenant)
    worker = pipeline.pids["worker"]
    os.kill(worker, signal.SIGSTOP)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{gateway.base_url}/chat/completions", json=body, headers=headers, timeout=1.0)
        metrics = f"{gateway.base_url.removesuffix('/v1')}/metrics"
        wait_for(
            lambda: "tidegate_gateway_cancelled_total 1.0" in httpx.get(metrics).text,
            10,
            "the gateway to cancel the abandoned stream",
        )
    finally:
        os.kill(worker, signal.SIGCONT)

    def answered() -> dict | None:
        decoded = [get_codec().decode(m.value()) for m in replies.poll()]
        ours = [r for name, r in decoded if name == "InferenceReply" and r["status"] != "ok"]
        return ours[0] if ours else None

    reply = wait_for(answered, 60, "the abandoned stream's reply")
    assert reply["status"] == "expired" and "cancelled by the caller before inference" in reply["error"], reply
    replies.close()


def test_a_restarted_stream_ends_in_an_error_event_not_in_a_wrong_text() -> None:
    """The reply came from another run whose text took another turn (a `restart`
    chunk, streams/stitching.py): SSE deltas cannot be taken back, so the caller is
    told, and never handed a text that is not the reply's."""
    reply = Reply("r1", "ok", text="Azure, they say", tokens_out=3)
    rest = [Chunk("r1", 1, ", mostly"), Chunk("r1", 2, "Azure, they say", 3, reply, restart=True)]

    async def later() -> AsyncIterator[Chunk]:
        for chunk in rest:
            yield chunk

    async def collect() -> list[bytes]:
        asked = {"model": "m", "max_new_tokens": 8, "include_usage": False}
        return [e async for e in sse_events(Chunk("r1", 0, "Blue"), later(), asked, lambda: None)]

    events = [orjson.loads(e.removeprefix(b"data: ")) for e in asyncio.run(collect()) if e != b"data: [DONE]\n\n"]
    texts = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
    assert texts == ["", "Blue", ", mostly"]
    assert events[-1]["error"]["code"] == "stream_superseded"
