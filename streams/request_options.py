"""The options of one request, as a caller gives them to `Client.submit`, `generate`
and `stream`: one frozen type, checked once, where the three methods repeated one
eleven-keyword signature and checked nothing (a priority the pressure board did not
know was a KeyError deep in admission; a `str` where messages belong, an
AttributeError in the codec).

    options = RequestOptions(model="smol", fallbacks=("tiny",), max_new_tokens=32)
    reply = await client.generate(messages, "s1", options)           # or
    reply = await client.generate(messages, "s1", model="smol", max_new_tokens=32)

Keywords given beside an options object replace its fields (`RequestOptions.of`).
A wrong name, type or value raises `InvalidRequest` before anything is sent; it is
a TypeError and a ValueError as well as a TidegateError, so a caller catching any
of the three gets it. Limits that belong to the deployment (`max_new_tokens` up to
MAX_NEW_TOKENS_LIMIT, whether a model is served) are the processors' to check: they
answer `invalid` saying why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from streams.exceptions import TidegateError
from streams.fleet import MAX_FALLBACKS, MODEL_ID
from streams.tenants import TENANT_NAME
from streams.validation import MAX_ID_CHARS, PRIORITIES


class InvalidRequest(TidegateError, TypeError, ValueError):
    """A request the client will not send: an unknown option, or one of a wrong type
    or value (the message says which). Nothing was sent."""


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """How one request is to be served.

    :param tenant: the request's tenant; None: the client's.
    :param priority: `low` is refused first under pressure, `high` last.
    :param max_new_tokens: at most this many tokens are generated (1 and up).
    :param deadline_s: seconds from now after which nobody waits for the reply; 0: none.
    :param temperature: 0 is greedy decoding.
    :param strategy: context compression (`window`, `summary`, `relevance`,
        `prefix-stable`); None: the configured default.
    :param request_id: the request's id (replies are matched on it); None: a fresh one.
    :param metadata: string pairs carried with the request.
    :param wait: when the path is full, retry at the refusal's retry time until the
        deadline instead of raising QueueFull at once.
    :param model: the model asked for, an id or alias of the fleet's; "": the fleet's
        default model.
    :param fallbacks: models to try, in order, when the asked one's pools are full or
        failing (at most MAX_FALLBACKS); empty: the model's default chain.
    """

    tenant: str | None = None
    priority: str = "normal"
    max_new_tokens: int = 64
    deadline_s: float = 30.0
    temperature: float = 0.0
    strategy: str | None = None
    request_id: str | None = None
    metadata: Mapping[str, str] | None = field(default=None, hash=False)
    wait: bool = False
    model: str = ""
    fallbacks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self)
        # stored in the types the record takes: a list of fallbacks becomes a tuple (the
        # options stay frozen), whole seconds and temperatures become floats
        object.__setattr__(self, "fallbacks", tuple(self.fallbacks))
        object.__setattr__(self, "deadline_s", float(self.deadline_s))
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.metadata is not None:
            object.__setattr__(self, "metadata", dict(self.metadata))

    @classmethod
    def of(cls, options: RequestOptions | None, changes: Mapping[str, Any]) -> RequestOptions:
        """`options` (default: the defaults) with the keyword `changes` in place of its
        fields: what `submit`, `generate` and `stream` do with their arguments.

        :raises InvalidRequest: an unknown keyword, or a field of a wrong type or value."""
        if options is not None and not isinstance(options, RequestOptions):
            raise InvalidRequest(f"options must be a RequestOptions, got {type(options).__name__}")
        unknown = sorted(set(changes) - set(OPTION_NAMES))
        if unknown:
            raise InvalidRequest(f"unknown request option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
        base = options if options is not None else DEFAULT_OPTIONS
        return dataclasses.replace(base, **changes) if changes else base

    def replace(self, **changes: Any) -> RequestOptions:
        """A copy with `changes`, checked as the original was."""
        return RequestOptions.of(self, changes)


class OptionFields(TypedDict, total=False):
    """The options as keywords (`**kwargs: Unpack[OptionFields]`): type checkers and
    editors see the names and types `submit`, `generate` and `stream` take. Kept equal
    to RequestOptions' fields (tests/test_request_options.py checks it)."""

    tenant: str | None
    priority: str
    max_new_tokens: int
    deadline_s: float
    temperature: float
    strategy: str | None
    request_id: str | None
    metadata: Mapping[str, str] | None
    wait: bool
    model: str
    fallbacks: Sequence[str]


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RequestOptions))


def check_messages(messages: Any, session_id: Any) -> None:
    """Raises InvalidRequest unless `messages` is a list of `{"role", "content"}`
    string pairs and `session_id` a string: caught here, not as a KeyError in the codec."""
    if not isinstance(session_id, str):
        raise InvalidRequest(f"session_id must be a string, got {type(session_id).__name__}")
    if not isinstance(messages, (list, tuple)):
        raise InvalidRequest(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}] must be a dict with string 'role' and 'content'")


def _check(o: RequestOptions) -> None:
    """Raises InvalidRequest naming the first field of a wrong type or value."""
    if o.tenant is not None and not (isinstance(o.tenant, str) and TENANT_NAME.fullmatch(o.tenant)):
        raise InvalidRequest(f"tenant {str(o.tenant)[:80]!r} must be 1-64 letters, digits, '_' or '-'")
    if o.priority not in PRIORITIES:
        raise InvalidRequest(f"priority must be one of {', '.join(PRIORITIES)}, got {str(o.priority)[:40]!r}")
    if not _whole(o.max_new_tokens) or o.max_new_tokens < 1:
        raise InvalidRequest(f"max_new_tokens must be a whole number >= 1, got {o.max_new_tokens!r}")
    if not _number(o.deadline_s) or o.deadline_s < 0:
        raise InvalidRequest(f"deadline_s must be a number of seconds >= 0 (0: none), got {o.deadline_s!r}")
    if not _number(o.temperature) or o.temperature < 0:
        raise InvalidRequest(f"temperature must be a finite number >= 0, got {o.temperature!r}")
    for name in ("strategy", "request_id"):
        value = getattr(o, name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string or None, got {type(value).__name__}")
    if o.request_id is not None and len(o.request_id) > MAX_ID_CHARS:
        raise InvalidRequest(f"request_id is {len(o.request_id)} characters, over the limit of {MAX_ID_CHARS}")
    if o.metadata is not None and not (
        isinstance(o.metadata, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in o.metadata.items())
    ):
        raise InvalidRequest("metadata must be a mapping of strings to strings")
    if not isinstance(o.wait, bool):
        raise InvalidRequest(f"wait must be True or False, got {type(o.wait).__name__}")
    if not isinstance(o.model, str):
        raise InvalidRequest(f"model must be a model id (a string), got {type(o.model).__name__}")
    if o.model and not MODEL_ID.fullmatch(o.model):
        raise InvalidRequest(f"model {o.model[:80]!r} is not a model id (1-128 letters, digits or ._:/@-)")
    _check_fallbacks(o.fallbacks)


def _check_fallbacks(fallbacks: Any) -> None:
    if isinstance(fallbacks, str) or not isinstance(fallbacks, (list, tuple)):
        raise InvalidRequest(f"fallbacks must be a list of model ids, got {type(fallbacks).__name__}")
    if len(fallbacks) > MAX_FALLBACKS:
        raise InvalidRequest(f"fallbacks names {len(fallbacks)} models, at most {MAX_FALLBACKS}")
    for name in fallbacks:
        if not isinstance(name, str) or not MODEL_ID.fullmatch(name):
            raise InvalidRequest(f"fallbacks: {str(name)[:80]!r} is not a model id (1-128 letters, digits or ._:/@-)")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


DEFAULT_OPTIONS = RequestOptions()
