"""Checks on the fields every stage acts on, whoever produced the record.

A request reaches the processors from any Kafka client, and an envelope reaches
the workers from any client allowed to write the contexts topic, so both stages
check what could hurt them or a neighbour before acting: where the reply goes,
how many tokens to generate, the sampling temperature, the size of identifiers.
The processors' request checks (processors/validation.py) start from these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from streams.config import Settings

PRIORITIES = ("low", "normal", "high")
MAX_ID_CHARS = 256  # request_id, session_id and tenant: keys in Kafka and Redis


def reply_to_reason(reply_to: str, settings: Settings, tenant: str | None = None) -> str | None:
    """None when replies may go to `reply_to`: the deployment's reply topic or a topic
    under it (`<replies>.<name>`), never another stage's input or a stranger's topic;
    for a request from `tenant`'s own request topic, only a topic under
    `<replies>.<tenant>.`: one tenant cannot send replies to another's."""
    if tenant is not None:
        own = settings.topics.tenant_replies(tenant)
        if reply_to.startswith(own) and len(reply_to) > len(own):
            return None
        return f"reply_to {reply_to[:80]!r} is not a reply topic of tenant {tenant!r} ({own}...)"
    replies = settings.topics.replies
    if reply_to == replies or reply_to.startswith(f"{replies}."):
        return None
    return f"reply_to {reply_to[:80]!r} is not {replies!r} or a topic under it"


def field_reason(record: Mapping[str, Any], settings: Settings) -> str | None:
    """None when the fields shared by requests and envelopes are acceptable, else the
    first thing wrong (the `invalid` reply's error text). `reply_to` is checked apart
    (reply_to_reason, ReplyTopics): a record that cannot be replied to is dead-lettered."""
    for name in ("request_id", "session_id", "tenant"):
        if len(record[name]) > MAX_ID_CHARS:
            return f"{name} is {len(record[name])} characters, over the limit of {MAX_ID_CHARS}"
    if not record["request_id"]:
        return "request_id is empty"
    if not 1 <= record["max_new_tokens"] <= settings.max_new_tokens_limit:
        return f"max_new_tokens must be 1..{settings.max_new_tokens_limit}, got {record['max_new_tokens']}"
    temperature = record["temperature"]
    if not math.isfinite(temperature) or temperature < 0:
        return f"temperature must be a finite number >= 0, got {temperature}"
    return None


def prompt_reason(messages: Sequence[Mapping[str, Any]], settings: Settings) -> str | None:
    """None when the messages are within the deployment's count and size limits (the
    processors' check, and the gateway's before anything is sent), else why not."""
    if len(messages) > settings.max_messages:
        return f"{len(messages)} messages, over the limit of {settings.max_messages}"
    size = sum(len(m["content"]) for m in messages)
    if size > settings.max_prompt_chars:
        return f"prompt is {size} characters, over the limit of {settings.max_prompt_chars}"
    return None
