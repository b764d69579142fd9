"""A request as the client sends it, built from a caller's arguments, and when to send
one again after a refusal.

Pure logic, no I/O: `Client.submit` builds each request here from its
RequestOptions (streams/request_options.py, streams/client.py), and
`Client.generate` and the client's admission (streams/client_admission.py) wait the
retry delay between tries.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

from schemas import AVRO, content_type_header, get_codec
from streams.outgoing import Outgoing, now_ms
from streams.request_options import RequestOptions, check_messages

Messages = list[dict[str, str]]
MIN_RETRY_MS = 10


def build_request(
    messages: Messages, session_id: str, options: RequestOptions, *, tenant: str, reply_to: str, stream: bool = False
) -> dict[str, Any]:
    """The InferenceRequest record of `options` (a fresh id unless they give one; the
    client's `tenant` unless they name one); its deadline is `deadline_s` from now in
    epoch ms, 0 (none) when `deadline_s` is 0.

    :raises InvalidRequest: `messages` or `session_id` of a wrong shape."""
    check_messages(messages, session_id)
    created = now_ms()
    deadline_s = options.deadline_s
    return {
        "request_id": options.request_id or uuid.uuid4().hex,
        "session_id": session_id,
        "tenant": options.tenant or tenant,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "priority": options.priority,
        "max_new_tokens": options.max_new_tokens,
        "temperature": options.temperature,
        "created_ms": created,
        "deadline_ms": created + max(1, int(deadline_s * 1000)) if deadline_s else 0,
        "reply_to": reply_to,
        "strategy": options.strategy,
        "metadata": dict(options.metadata or {}),
        "stream": stream,
        "model": options.model,
        "fallbacks": list(options.fallbacks),
    }


def request_record(request: dict[str, Any], topic: str) -> Outgoing:
    """The request as the record for `topic`, Avro, keyed by its session (one session's
    requests stay in order, on one partition). One naming no model and no fallbacks in
    the schema from before fleets (Codec.encode_readable): processors not upgraded yet
    read it."""
    value = get_codec().encode_readable("InferenceRequest", request)
    return Outgoing(topic, request["session_id"].encode(), value, [content_type_header(AVRO)])


def retry_delay_ms(retry_after_ms: int) -> float:
    """The refusal's own retry time (each refusal gets its own, one drain interval after
    the one before: streams/pressure.py), plus up to a quarter: callers told the same
    time (no drain rate measured yet) do not come back together. Doubling it per attempt
    as well made a caller wait up to 16x what it had been told."""
    return max(MIN_RETRY_MS, retry_after_ms) * random.uniform(1.0, 1.25)
