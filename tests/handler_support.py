"""For the tests that drive the processors' RequestHandler directly (on a real Redis
where they need one): raw request records as a client produces them, and a run of
the handler that collects what it delivers."""

from __future__ import annotations

import asyncio
import uuid

from processors.handler import Incoming, RequestHandler
from schemas import get_codec
from streams.outgoing import Outgoing, now_ms


def request_record(
    session: str = "s",
    text: str = "hello",
    *,
    tenant: str = "acme",
    priority: str = "normal",
    strategy: str | None = None,
    reply_to: str = "tidegate.replies",
    request_id: str | None = None,
    deadline_ms: int = 0,
) -> Incoming:
    """An Avro InferenceRequest record read from the shared request topic."""
    request = {
        "request_id": request_id or uuid.uuid4().hex,
        "session_id": session,
        "tenant": tenant,
        "messages": [{"role": "user", "content": text}],
        "priority": priority,
        "max_new_tokens": 8,
        "temperature": 0.0,
        "created_ms": 0,
        "deadline_ms": deadline_ms,
        "reply_to": reply_to,
        "strategy": strategy,
        "metadata": {},
    }
    return Incoming(get_codec().encode("InferenceRequest", request), b"k", [], "tidegate.requests", 0, 0)


def delivered(runner: asyncio.Runner, handler: RequestHandler, records: list[Incoming]) -> list[Outgoing]:
    """What the handler delivers for one batch (each delivery acknowledged at once)."""
    out: list[Outgoing] = []

    async def deliver(outgoing: list[Outgoing]) -> None:
        out.extend(outgoing)

    runner.run(handler.handle(records, deliver))
    return out


def answered(runner: asyncio.Runner, handler: RequestHandler, records: list[Incoming]) -> list[Outgoing]:
    """What the processors' agent delivers for one batch (processors/app.py): the
    handler's outputs and, should the batch fail as a whole, the failure path's."""
    out: list[Outgoing] = []

    async def deliver(outgoing: list[Outgoing]) -> None:
        out.extend(outgoing)

    runner.run(handler.answer(records, deliver))
    return out


def pressure(level: str, lag: int, cap: int = 100) -> dict:
    """A workers' PressureState as the monitor publishes it, for a PressureBoard."""
    return {
        "stage": "workers",
        "lag": lag,
        "cap": cap,
        "state": level,
        "drain_rate": 100.0,
        "drain_time_ms": 0,
        "updated_ms": now_ms(),
    }
