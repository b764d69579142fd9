"""A streamed request's chunks handed to its caller as they arrive, then its reply.

The reply reader queues each chunk of a streamed request on its pending entry
(streams/pending.py) and resolves its future with the reply; `stream_chunks` turns
the two into the caller's chunks: one generation's text, stitched
(streams/stitching.py), the reply as the last chunk. The reply ends the stream only
after every chunk queued before it: a reply is produced after its generation's
chunks, on the same partition.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from streams.exceptions import ReplyTimeout
from streams.pending import PendingRequest
from streams.reply import Chunk
from streams.stitching import StreamStitcher


async def stream_chunks(request_id: str, pending: PendingRequest) -> AsyncIterator[Chunk]:
    """The caller's chunks of a streamed request, the last one carrying its reply.

    :raises ReplyTimeout: no reply came by the request's `give_up_at`.
    """
    assert pending.chunks is not None
    stitcher = StreamStitcher(request_id)
    while True:
        chunk = None if pending.chunks.empty() else pending.chunks.get_nowait()
        if chunk is None and not pending.future.done():
            chunk = await next_chunk(pending)
        if chunk is not None:
            handed = stitcher.add(chunk)
            if handed is not None:
                yield handed
            continue
        # the reply came after every chunk its own generation sent before it
        yield stitcher.end(pending.future.result())
        return


async def next_chunk(pending: PendingRequest) -> Chunk | None:
    """The next chunk, or None once the reply came; ReplyTimeout past the deadline."""
    assert pending.chunks is not None
    queued = asyncio.ensure_future(pending.chunks.get())
    wait_s = max(0.0, pending.give_up_at - time.monotonic())
    try:
        done, _ = await asyncio.wait({queued, pending.future}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # cancelled from outside too (the gateway, on every hang-up before the first
        # chunk): `asyncio.wait` leaves its tasks running, and a pending Queue.get was
        # left behind each time ("Task was destroyed but it is pending")
        if not queued.done():
            queued.cancel()
    if queued in done:
        return queued.result()
    if not done:
        raise ReplyTimeout("no reply in time to a streamed request")
    return None
