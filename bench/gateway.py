"""`tidegate bench gateway`: what the HTTP front costs, how fast it refuses, and how
soon streamed text arrives.

One dev stack with the gateway (`echo` model, Apache Kafka), in one run:

- overhead: requests one at a time, in turn through the Python client, through
  HTTP from a minimal keep-alive client (`RawHttp`: what the gateway adds, as wrk
  or any compiled client would see it) and through httpx (what a Python caller
  sees: httpx itself takes ~1 ms of CPU per call on the 2-core machine, more than
  the whole tidegate client); the differences of the p50s against the client's;
- 429: with the workers' stage held past its cap (no worker, the cap filled), the
  gateway's 429s timed at the caller (RawHttp, and httpx), p50 and p99;
- time to first token: a `tiny` model stack (continuous batching), streamed over
  HTTP: first content chunk and last one, p50.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.stats import percentile
from streams.client import Client
from streams.config import Settings
from tidegate import devstack

WARMUP = 10
REQUESTS = 1000  # pairs: the p50s of a few hundred moved by +-0.5 ms from run to run
REFUSALS = 1000  # the p99 from the slowest 10, not 3
STREAMS = 20


def _settings(stack: devstack.DevStack, **overrides: Any) -> Settings:
    return Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url, broker=stack.broker, **overrides)


class RawHttp:
    """One keep-alive HTTP/1.1 connection, requests written and responses read by
    hand: a caller whose own cost is next to nothing, so the time it sees is the
    gateway's (and the pipeline's)."""

    def __init__(self, base_url: str, api_key: str) -> None:
        url = httpx.URL(base_url)
        self.host, self.port, self.prefix = url.host, url.port or 80, url.path.rstrip("/")
        self.api_key = api_key
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawHttp:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None
        payload = orjson.dumps(body)
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nhost: {self.host}\r\n"
            f"authorization: Bearer {self.api_key}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n"
        )
        self._writer.write(head.encode() + payload)
        status_line, *header_lines = (await self._reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        length = next(int(h.split(":", 1)[1]) for h in header_lines if h.lower().startswith("content-length:"))
        return int(status_line.split()[1]), await self._reader.readexactly(length)


async def _paired_ms(stack: devstack.DevStack, settings: Settings, n: int) -> dict[str, list[float]]:
    """`n` requests through the Python client, `n` through RawHttp and `n` through
    httpx, in turn (so warm-up and drift fall on all alike), one at a time."""
    times: dict[str, list[float]] = {"client": [], "http": [], "httpx": []}
    headers = {"authorization": f"Bearer {stack.api_key}"}
    async with (
        Client(settings=settings) as client,
        RawHttp(stack.gateway or "", stack.api_key or "") as raw,
        httpx.AsyncClient(base_url=stack.gateway or "", headers=headers, timeout=60) as http,
    ):
        for i in range(WARMUP + n):
            started = time.perf_counter()
            reply = await client.generate([{"role": "user", "content": f"q {i}"}], f"py-{i}", max_new_tokens=8)
            after_client = time.perf_counter()
            raw_status, raw_body = await raw.post("/chat/completions", _body(i))
            after_raw = time.perf_counter()
            response = await http.post("/chat/completions", json=_body(i))
            ended = time.perf_counter()
            if not reply.ok or raw_status != 200 or response.status_code != 200:
                raise RuntimeError(f"failed: client {reply.status}, HTTP {raw_status} {raw_body[:200]!r}, {response}")
            if i >= WARMUP:
                times["client"].append((after_client - started) * 1000)
                times["http"].append((after_raw - after_client) * 1000)
                times["httpx"].append((ended - after_raw) * 1000)
    return times


def _body(i: int, stream: bool = False) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 8, "stream": stream}


async def _refused_ms(stack: devstack.DevStack, n: int) -> dict[str, list[float]]:
    """`n` requests through RawHttp and `n` through httpx, in turn, each one a 429
    with retry-after-ms."""
    times: dict[str, list[float]] = {"http": [], "httpx": []}
    headers = {"authorization": f"Bearer {stack.api_key}"}
    async with (
        RawHttp(stack.gateway or "", stack.api_key or "") as raw,
        httpx.AsyncClient(base_url=stack.gateway or "", headers=headers, timeout=60) as http,
    ):
        for i in range(WARMUP + n):
            started = time.perf_counter()
            raw_status, raw_body = await raw.post("/chat/completions", _body(i))
            middle = time.perf_counter()
            response = await http.post("/chat/completions", json=_body(i))
            ended = time.perf_counter()
            if raw_status != 429 or response.status_code != 429:
                raise RuntimeError(f"HTTP {raw_status} and {response.status_code}, expected 429: {raw_body[:200]!r}")
            if not response.headers.get("retry-after-ms"):
                raise RuntimeError("a 429 without retry-after-ms")
            if i >= WARMUP:
                times["http"].append((middle - started) * 1000)
                times["httpx"].append((ended - middle) * 1000)
    return times


async def _stream_ms(stack: devstack.DevStack, n: int) -> tuple[list[float], list[float]]:
    first, last = [], []
    headers = {"authorization": f"Bearer {stack.api_key}"}
    async with httpx.AsyncClient(base_url=stack.gateway or "", headers=headers, timeout=120) as http:
        for i in range(n + 2):
            body = {**_body(i, stream=True), "model": "tiny", "max_tokens": 32}
            started, first_at = time.perf_counter(), None
            async with http.stream("POST", "/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = orjson.loads(line[6:])
                    if first_at is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                        first_at = time.perf_counter()
            if i >= 2 and first_at is not None:
                first.append((first_at - started) * 1000)
                last.append((time.perf_counter() - started) * 1000)
    return first, last


async def _fill(settings: Settings, count: int) -> None:
    async with Client(settings=settings) as client:
        for i in range(count):
            await client.submit([{"role": "user", "content": f"fill {i}"}], f"fill-{i}", deadline_s=600)


async def _until_refused(stack: devstack.DevStack, timeout_s: float = 30.0) -> None:
    """Until the gateway answers 429 (the monitor published the filled stage)."""
    headers = {"authorization": f"Bearer {stack.api_key}"}
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=stack.gateway or "", headers=headers, timeout=10) as http:
        while (await http.post("/chat/completions", json=_body(0))).status_code != 429:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 429 within {timeout_s:.0f}s of filling the workers' stage")
            await asyncio.sleep(0.1)


def _p(values: list[float], q: float) -> float:
    return round(percentile(values, q), 2)


def run() -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "gateway", "broker": "kafka"}
    logs = Path(".tidegate/bench-logs")
    print("== gateway: echo stack, the client and HTTP one request at a time")
    # one request at a time, as fast as they come back: a cap far above it (at the minimum cap of
    # 64 the clients' own recent admissions, counted until a state after them, refuse a few)
    roomy = {"TIDEGATE_WORKERS_CAP_MESSAGES": "100000"}
    stack = devstack.up(
        model="echo", log_dir=logs / "gateway-echo", extra_env=roomy, state_file=logs / "gateway-echo.json"
    )
    try:
        stack = devstack.start_gateway(stack, logs / "gateway-echo.json")
        times = asyncio.run(_paired_ms(stack, _settings(stack, workers_cap_messages=100_000), REQUESTS))
    finally:
        stack.stop()
    for name, values in times.items():
        results[f"{name}_p50_ms"] = _p(values, 50)
    results["http_overhead_p50_ms"] = round(results["http_p50_ms"] - results["client_p50_ms"], 2)
    results["httpx_overhead_p50_ms"] = round(results["httpx_p50_ms"] - results["client_p50_ms"], 2)
    print(
        f"client p50 {results['client_p50_ms']} ms, HTTP p50 {results['http_p50_ms']} ms "
        f"(overhead {results['http_overhead_p50_ms']} ms), through httpx {results['httpx_p50_ms']} ms "
        f"(overhead {results['httpx_overhead_p50_ms']} ms)"
    )

    print("== gateway: the worker stopped (SIGSTOP), the workers' cap filled: 429s")
    env = {"TIDEGATE_WORKERS_CAP_MESSAGES": "5"}
    stack = devstack.up(model="echo", log_dir=logs / "gateway-full", extra_env=env, state_file=logs / "gf.json")
    workers = stack.role_pids("worker")
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        stack = devstack.start_gateway(stack, logs / "gf.json")
        asyncio.run(_fill(_settings(stack, backpressure=False, workers_cap_messages=5), 10))
        asyncio.run(_until_refused(stack))
        refused = asyncio.run(_refused_ms(stack, REFUSALS))
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        stack.stop()
    results["429_p50_ms"], results["429_p99_ms"] = _p(refused["http"], 50), _p(refused["http"], 99)
    results["429_httpx_p50_ms"], results["429_httpx_p99_ms"] = _p(refused["httpx"], 50), _p(refused["httpx"], 99)
    print(
        f"429 p50 {results['429_p50_ms']} ms, p99 {results['429_p99_ms']} ms; through httpx "
        f"p50 {results['429_httpx_p50_ms']} ms, p99 {results['429_httpx_p99_ms']} ms"
    )

    print("== gateway: tiny model, streamed over HTTP")
    stack = devstack.up(model="tiny", log_dir=logs / "gateway-tiny", state_file=logs / "gateway-tiny.json")
    try:
        stack = devstack.start_gateway(stack, logs / "gateway-tiny.json")
        first, last = asyncio.run(_stream_ms(stack, STREAMS))
    finally:
        stack.stop()
    results["stream_first_token_p50_ms"], results["stream_last_token_p50_ms"] = _p(first, 50), _p(last, 50)
    print(f"streamed: first token p50 {results['stream_first_token_p50_ms']} ms, last {_p(last, 50)} ms")
    return results
