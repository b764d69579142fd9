"""Checks a decoded request before any work: a bad one gets an `invalid` reply saying why."""

from __future__ import annotations

from typing import Any

from processors.compression import STRATEGIES
from streams.config import Settings
from streams.validation import PRIORITIES, field_reason, prompt_reason

ROLES = frozenset({"system", "user", "assistant"})


def invalid_reason(request: dict[str, Any], settings: Settings) -> str | None:
    """None for a good request, else the first thing wrong with it (its `reply_to` was
    checked before: a request that cannot be replied to is dead-lettered)."""
    shared = field_reason(request, settings)
    if shared is not None:
        return shared
    messages = request["messages"]
    if not messages:
        return "messages is empty"
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            return f"message {i} has unknown role {message['role']!r} (expected one of {sorted(ROLES)})"
    if all(m["role"] == "system" for m in messages):
        return "messages has only system messages: nothing to answer"
    too_much = prompt_reason(messages, settings)
    if too_much is not None:
        return too_much
    if request["priority"] not in PRIORITIES:
        return f"unknown priority {request['priority']!r} (expected one of {list(PRIORITIES)})"
    if request["strategy"] is not None and request["strategy"] not in STRATEGIES:
        return f"unknown strategy {request['strategy']!r} (expected one of {sorted(STRATEGIES)})"
    return None
