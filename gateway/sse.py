"""A streamed chat completion as OpenAI's server-sent events: `chat.completion.chunk`s
as the text is generated, then `data: [DONE]`; an error after the first chunk is an
event of its own (`data: {"error": ...}`), the HTTP status being sent by then.

The chunks before the reply show the model the request was routed to; the last
ones (the finish reason, the usage) the model that served it, and where a fallback
did, which and why (`tidegate`), as the non-streamed completion says it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from gateway.models import ServedModels
from gateway.openai_shapes import fallback_field
from streams import ReplyTimeout
from streams.exceptions import TidegateError
from streams.reply import Chunk


def _event(payload: dict[str, Any] | str) -> bytes:
    return b"data: " + (payload.encode() if isinstance(payload, str) else orjson.dumps(payload)) + b"\n\n"


async def sse_events(
    first: Chunk, chunks: AsyncIterator[Chunk], asked: dict[str, Any], abandon: Callable[[], None]
) -> AsyncIterator[bytes]:
    """The chunks as OpenAI server-sent events; the last one (the reply) ends them.
    Closed before that (the caller went away): `abandon` cancels the request."""
    try:
        async for event in _events(first, chunks, asked):
            yield event
    except BaseException:
        abandon()
        raise


async def _events(first: Chunk, chunks: AsyncIterator[Chunk], asked: dict[str, Any]) -> AsyncIterator[bytes]:
    base = {"id": f"chatcmpl-{first.request_id}", "object": "chat.completion.chunk", "created": int(time.time())}
    served: ServedModels | None = asked.get("served")  # the models it was routed among
    base["model"] = served.shown(asked["model"]) if served is not None else asked["model"]

    def delta(content: dict[str, str], finish: str | None = None) -> bytes:
        return _event({**base, "choices": [{"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}]})

    yield delta({"role": "assistant", "content": ""})
    chunk = first
    while True:
        if chunk.restart:
            # the reply came from another run of the request than the one streamed,
            # and its text took another turn (streams/stitching.py): SSE deltas cannot
            # be taken back, so the caller is told instead of handed a text that is
            # not the reply's
            why = "the streamed text was superseded by another run of this request; retry, or ask without streaming"
            yield _event({"error": {"message": why, "type": "server_error", "code": "stream_superseded"}})
            break
        if chunk.text:
            yield delta({"content": chunk.text})
        reply = chunk.reply
        if reply is not None:
            if reply.status != "ok":
                yield _event(
                    {"error": {"message": reply.error or reply.status, "type": "server_error", "code": reply.status}}
                )
                break
            # the reply says which model served it: the last chunks show it
            if served is not None:
                base |= {"model": served.shown(asked["model"], reply)} | fallback_field(reply)
            yield delta({}, "length" if reply.tokens_out >= asked["max_new_tokens"] else "stop")
            if asked["include_usage"]:
                usage = {"prompt_tokens": reply.tokens_in, "completion_tokens": reply.tokens_out}
                usage["total_tokens"] = reply.tokens_in + reply.tokens_out
                yield _event({**base, "choices": [], "usage": usage})
            break
        try:
            chunk = await anext(chunks)
        except (ReplyTimeout, TidegateError) as exc:
            yield _event({"error": {"message": str(exc), "type": "timeout", "code": "timeout"}})
            break
    yield _event("[DONE]")
