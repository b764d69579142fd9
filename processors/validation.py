"""Checks a decoded request before any work: a bad one gets an `invalid` reply saying why."""

from __future__ import annotations

from typing import Any

from processors.compression import STRATEGIES
from streams.config import Settings
from streams.fleet import MAX_FALLBACKS, Fleet
from streams.validation import PRIORITIES, field_reason, prompt_reason

ROLES = frozenset({"system", "user", "assistant"})
MODEL_SHOWN_CHARS = 80  # of a request's unknown `model` in the reply: it may be any length
SERVED_SHOWN = 16  # models named in that reply; a fleet has up to 64


def invalid_reason(request: dict[str, Any], settings: Settings, fleet: Fleet | None = None) -> str | None:
    """None for a good request, else the first thing wrong with it (its `reply_to` was
    checked before: a request that cannot be replied to is dead-lettered). With the
    `fleet`, its `model` must be one the fleet serves (model_reason)."""
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
    return model_reason(request, fleet) if fleet is not None else None


def model_reason(request: dict[str, Any], fleet: Fleet) -> str | None:
    """None when the request's `model` is empty (the fleet's default) or an id or alias
    of the fleet and its `fallbacks` are few enough, else why not: an unknown model is
    named (bounded) beside the models served. Unknown fallbacks are left out of its
    candidates (Fleet.candidates), not refused: a caller's chain may name models another
    deployment serves."""
    model = request.get("model") or ""
    if model and fleet.resolve(model) is None:
        served = list(fleet.models)
        names = ", ".join(served[:SERVED_SHOWN])
        if len(served) > SERVED_SHOWN:
            names += f" and {len(served) - SERVED_SHOWN} more"
        return f"unknown model {model[:MODEL_SHOWN_CHARS]!r}; served: {names}"
    fallbacks = request.get("fallbacks") or []
    if len(fallbacks) > MAX_FALLBACKS:
        return f"fallbacks names {len(fallbacks)} models, at most {MAX_FALLBACKS}"
    return None
