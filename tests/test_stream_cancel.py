"""A streamed request cancelled before its first chunk leaves no task behind.

The gateway cancels a stream's first `anext` on every hang-up before the first
chunk (gateway/app.py). `next_chunk` (streams/streaming.py) waits on a `Queue.get`
task of its own beside the reply's future; cancelled from outside, it left that task
pending, one per hang-up, each logged "Task was destroyed but it is pending" once
collected. Pure logic: the pending entry and its queue are the client's own objects,
no broker needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

import pytest

from streams.pending import PendingRequest
from streams.reply import Chunk, Reply
from streams.streaming import stream_chunks

STREAMS = 50


async def _cancel_streams_before_their_first_chunk() -> list[str]:
    """STREAMS streams waiting for their first chunk, each cancelled as the gateway
    does (the first `anext` cancelled, then the generator closed); the tasks left."""
    loop = asyncio.get_running_loop()
    before = asyncio.all_tasks()
    pendings = [
        PendingRequest(loop.create_future(), time.monotonic() + 30, sending=False, chunks=asyncio.Queue())
        for _ in range(STREAMS)
    ]
    streams = [stream_chunks(f"r{i}", p) for i, p in enumerate(pendings)]
    firsts = [asyncio.ensure_future(anext(s)) for s in streams]
    # each first `anext` waits inside next_chunk: its own task and its Queue.get task
    give_up_at = time.monotonic() + 10
    while len(asyncio.all_tasks() - before) < 2 * STREAMS:
        assert time.monotonic() < give_up_at, "the streams never waited for their first chunk"
        await asyncio.sleep(0)
    for first in firsts:
        first.cancel()
    for first, stream in zip(firsts, streams, strict=True):
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await stream.aclose()
    for _ in range(3):  # the cancellations' callbacks run
        await asyncio.sleep(0)
    return [repr(t) for t in asyncio.all_tasks() - before]


def test_streams_cancelled_before_their_first_chunk_leave_no_pending_task(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop = asyncio.new_event_loop()
    try:
        left = loop.run_until_complete(_cancel_streams_before_their_first_chunk())
        gc.collect()  # a pending task collected is logged "Task was destroyed but it is pending"
    finally:
        loop.close()
    assert left == [], f"{len(left)} tasks left pending, e.g. {left[:1]}"
    destroyed = [r.getMessage() for r in caplog.records if "Task was destroyed but it is pending" in r.getMessage()]
    assert destroyed == []


def test_a_stream_still_ends_in_its_reply() -> None:
    """The chunks as before: the text, then the reply as the last chunk."""

    async def scenario() -> list[Chunk]:
        loop = asyncio.get_running_loop()
        pending = PendingRequest(loop.create_future(), time.monotonic() + 30, sending=False, chunks=asyncio.Queue())
        stream = stream_chunks("r1", pending)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        assert pending.chunks is not None
        pending.chunks.put_nowait(Chunk("r1", 0, "Blue", 1))
        handed = [await first]
        pending.future.set_result(Reply("r1", "ok", text="Blue sky", tokens_out=2))
        handed += [c async for c in stream]
        return handed

    chunks = asyncio.run(scenario())
    assert "".join(c.text for c in chunks) == "Blue sky"
    assert chunks[-1].reply is not None and chunks[-1].reply.status == "ok"
