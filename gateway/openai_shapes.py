"""OpenAI's request and response shapes, and tidegate's statuses as HTTP answers.

Overload is answered the way the official SDKs expect: 429 with an OpenAI error
body, `retry-after-ms` (which the openai SDK honours first, up to 120 s) and
`retry-after` in whole seconds, both from the drain time tidegate measured; not a
bare 503.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from starlette.responses import JSONResponse

from streams.fleet import MAX_FALLBACKS
from streams.reply import Reply

MAX_RETRY_AFTER_MS = 120_000  # the openai SDK does not wait longer than this
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant", "developer")


class BadRequest(ValueError):
    """The body is not a chat completion request tidegate can take; says why."""


def error(
    status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None, param: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def unauthorized() -> JSONResponse:
    """401 as OpenAI words it: the SDKs raise AuthenticationError."""
    return error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


def retry_headers(retry_after_ms: int | None) -> dict[str, str]:
    """`retry-after-ms` (1..120000) and `retry-after` (seconds, rounded up)."""
    ms = min(MAX_RETRY_AFTER_MS, max(1, int(retry_after_ms or 1000)))
    return {"retry-after-ms": str(ms), "retry-after": str(math.ceil(ms / 1000))}


def too_many(message: str, code: str, retry_after_ms: int | None, extra: dict[str, str] | None = None) -> JSONResponse:
    return error(
        429,
        message,
        "rate_limit_error" if code == "rate_limit_exceeded" else "server_overloaded",
        code,
        {
            **retry_headers(retry_after_ms),
            **(extra or {}),
        },
    )


def parse_chat_request(body: Any) -> dict[str, Any]:
    """The fields tidegate uses from a `POST /v1/chat/completions` body."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty array")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {list(ROLES)}")
        parsed.append(
            {"role": "system" if m["role"] == "developer" else m["role"], "content": _text(m.get("content"), i)}
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("`max_tokens` must be a positive integer")
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not math.isfinite(temperature):
        raise BadRequest("`temperature` must be a number")
    if body.get("n", 1) not in (1, None):
        raise BadRequest("only n=1 is supported")
    fallbacks = body.get("fallbacks") or []
    if (
        not isinstance(fallbacks, list)
        or len(fallbacks) > MAX_FALLBACKS
        or not all(isinstance(name, str) and name for name in fallbacks)
    ):
        raise BadRequest(f"`fallbacks` must be a list of at most {MAX_FALLBACKS} model names")
    options = body.get("stream_options") or {}
    return {
        "messages": parsed,
        "max_new_tokens": max_tokens,
        "temperature": float(temperature),
        "stream": bool(body.get("stream", False)),
        "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
        "model": body.get("model") if isinstance(body.get("model"), str) else "",
        "fallbacks": fallbacks,
    }


def _text(content: Any, index: int) -> str:
    """A message's text: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if all(isinstance(t, str) for t in parts) and parts:
            return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or an array of text parts")


def completion(reply: Reply, model: str, max_new_tokens: int) -> dict[str, Any]:
    """A `chat.completion` for an `ok` reply (`tidegate`: which fallback served it)."""
    body = {
        "id": f"chatcmpl-{reply.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": "length" if reply.tokens_out >= max_new_tokens else "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": reply.tokens_in,
            "completion_tokens": reply.tokens_out,
            "total_tokens": reply.tokens_in + reply.tokens_out,
        },
    }
    return body | fallback_field(reply)


def fallback_field(reply: Reply) -> dict[str, Any]:
    """`{"tidegate": {"fallback_from", "fallback_reason"}}` where a fallback served the
    request, else nothing: the SDKs keep a field they do not know (`model_extra`)."""
    if not reply.fallback_from:
        return {}
    return {"tidegate": {"fallback_from": reply.fallback_from, "fallback_reason": reply.fallback_reason}}


def fallback_headers(reply: Reply) -> dict[str, str]:
    """`x-tidegate-fallback-from` (the model asked for) and `-reason` (why another
    served it: `full`, `circuit_open`, `error`), where a fallback served the request."""
    if not reply.fallback_from:
        return {}
    return {"x-tidegate-fallback-from": reply.fallback_from, "x-tidegate-fallback-reason": reply.fallback_reason or ""}


def timing_headers(reply: Reply) -> dict[str, str]:
    """The stage timings of a reply, in ms: where the time went; where a fallback
    served it, the model asked for and why it did not (`x-tidegate-fallback-*`)."""
    t = reply.timings
    return {
        **fallback_headers(reply),
        "x-request-id": reply.request_id,
        "x-tidegate-queue-ms": str(t.queued_ms + t.batch_wait_ms),
        "x-tidegate-context-ms": str(t.context_ms),
        "x-tidegate-inference-ms": str(t.inference_ms),
        "x-tidegate-total-ms": str(t.total_ms),
    }


def new_request_id() -> str:
    return uuid.uuid4().hex
