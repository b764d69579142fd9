"""One request-options type for `submit`, `generate` and `stream` (issue 26, item 8):
the keywords callers write today still work, `model=` and `fallbacks=` reach the
InferenceRequest, and a bad option is a clear InvalidRequest before anything is sent."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import typing
from typing import Any

import pytest

from schemas import get_codec
from streams import Client, InvalidRequest, RequestOptions, Settings, TidegateError
from streams.client_requests import build_request, request_record
from streams.fleet import MAX_FALLBACKS
from streams.request_options import OPTION_NAMES, OptionFields

USER = [{"role": "user", "content": "hi"}]


def build(options: RequestOptions, stream: bool = False) -> dict[str, Any]:
    return build_request(USER, "s1", options, tenant="acme", reply_to="tidegate.replies.acme.x", stream=stream)


def test_the_keyword_type_names_every_option() -> None:
    assert set(typing.get_type_hints(OptionFields)) == set(OPTION_NAMES)
    assert set(OPTION_NAMES) >= {"tenant", "priority", "max_new_tokens", "deadline_s", "wait", "model", "fallbacks"}


def test_the_defaults_are_todays() -> None:
    """The eleven keywords' defaults before the options type, unchanged."""
    request = build(RequestOptions())
    assert request["tenant"] == "acme" and request["priority"] == "normal" and request["max_new_tokens"] == 64
    assert request["temperature"] == 0.0 and request["strategy"] is None and request["metadata"] == {}
    assert request["deadline_ms"] - request["created_ms"] == 30_000 and request["stream"] is False
    assert request["model"] == "" and request["fallbacks"] == []
    assert len(request["request_id"]) == 32


def test_model_and_fallbacks_reach_the_request_and_its_record() -> None:
    options = RequestOptions(model="smol", fallbacks=["tiny", "gpt-4o-mini"], max_new_tokens=8, tenant="beta")
    assert options.fallbacks == ("tiny", "gpt-4o-mini")  # stored frozen
    request = build(options, stream=True)
    assert request["model"] == "smol" and request["fallbacks"] == ["tiny", "gpt-4o-mini"]
    assert request["tenant"] == "beta" and request["stream"] is True
    name, decoded = get_codec().decode(request_record(request, "tidegate.requests").value)
    assert name == "InferenceRequest" and decoded == request


def test_keywords_replace_the_fields_of_an_options_object() -> None:
    base = RequestOptions(model="smol", priority="high")
    changed = RequestOptions.of(base, {"priority": "low", "deadline_s": 0})
    assert (changed.model, changed.priority, changed.deadline_s) == ("smol", "low", 0.0)
    assert base.priority == "high"  # frozen: the original is untouched
    assert RequestOptions.of(None, {}) == RequestOptions() and RequestOptions.of(base, {}) is base
    assert build(changed)["deadline_ms"] == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.model = "tiny"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"max_tokens": 8}, "unknown request option.*max_tokens.*known: tenant"),
        ({"model": 5}, "model must be a model id"),
        ({"model": "two words"}, "not a model id"),
        ({"fallbacks": "tiny"}, "fallbacks must be a list"),
        ({"fallbacks": ["m"] * (MAX_FALLBACKS + 1)}, f"at most {MAX_FALLBACKS}"),
        ({"fallbacks": ["tiny", None]}, "None.*is not a model id"),
        ({"priority": "urgent"}, "priority must be one of low, normal, high"),
        ({"max_new_tokens": "8"}, "max_new_tokens must be a whole number"),
        ({"max_new_tokens": True}, "max_new_tokens must be a whole number"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a whole number >= 1"),
        ({"deadline_s": -1}, "deadline_s must be"),
        ({"deadline_s": float("inf")}, "deadline_s must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"tenant": "a b"}, "tenant 'a b' must be"),
        ({"metadata": {"k": 1}}, "metadata must be a mapping of strings"),
        ({"wait": "yes"}, "wait must be True or False"),
        ({"request_id": 7}, "request_id must be a string"),
        ({"strategy": ["window"]}, "strategy must be a string"),
    ],
)
def test_a_bad_option_is_a_clear_error(changes: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidRequest, match=why) as refused:
        RequestOptions.of(None, changes)
    assert isinstance(refused.value, TidegateError) and isinstance(refused.value, TypeError)
    assert isinstance(refused.value, ValueError)


def test_options_of_another_type_and_bad_messages_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="options must be a RequestOptions, got dict"):
        RequestOptions.of({"model": "smol"}, {})  # type: ignore[arg-type]
    for messages, why in (("hi", "messages must be a list"), ([{"role": "user"}], r"messages\[0\] must be a dict")):
        with pytest.raises(InvalidRequest, match=why):
            build_request(messages, "s", RequestOptions(), tenant="t", reply_to="r")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="session_id must be a string"):
        build_request(USER, 5, RequestOptions(), tenant="t", reply_to="r")  # type: ignore[arg-type]


def test_the_three_methods_take_options_and_keywords_alike() -> None:
    """No copy of the eleven keywords is left on the methods: each takes an options
    object (third, positionally or by name) and the option keywords."""
    for method in (Client.submit, Client.generate, Client.stream):
        parameters = inspect.signature(method).parameters
        assert list(parameters)[:4] == ["self", "messages", "session_id", "options"], method
        assert parameters["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
        assert not set(parameters) & set(OPTION_NAMES), method


def test_submit_refuses_a_bad_keyword_before_anything_is_sent() -> None:
    """Checked before admission and the producer: a client that never started (no
    broker at all) raises the InvalidRequest, not an error of its own."""

    async def send_badly() -> int:
        client = Client(settings=Settings(bootstrap="127.0.0.1:1", backpressure=False))
        client._loop = asyncio.get_running_loop()  # as started, with nothing to send to
        with pytest.raises(InvalidRequest, match="unknown request option"):
            await client.submit(USER, "s1", max_token=8)  # type: ignore[call-arg]
        with pytest.raises(InvalidRequest, match="fallbacks must be a list"):
            await client.generate(USER, "s1", fallbacks="tiny")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="model must be a model id"):
            await anext(client.stream(USER, "s1", model=None))  # type: ignore[arg-type]
        return client.pending_count()

    assert asyncio.run(send_badly()) == 0
