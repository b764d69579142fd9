"""`engine: openai` in the fleet file (streams/fleet_remote.py): a pool served by a
remote OpenAI-compatible server, its keys checked with the rest of the file, one
line per mistake, and a key pasted where its variable's name belongs never echoed."""

from __future__ import annotations

from typing import Any

import pytest

from streams.config import Settings
from streams.fleet import FleetError, parse_fleet
from streams.fleet_remote import DEFAULT_MAX_IN_FLIGHT, OPENAI_ENGINE


def fleet_with(remote: dict[str, Any], local: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "models": {"smol": {"token_budget": 512}},
        "pools": {
            "local": {"engine": "echo", "models": ["smol"], **(local or {})},
            "hosted": {"engine": OPENAI_ENGINE, "models": ["smol"], **remote},
        },
    }


def test_a_remote_pool_beside_a_local_one_serves_the_same_model() -> None:
    fleet = parse_fleet(
        fleet_with(
            {
                "base_url": "https://api.example.com/v1/",
                "api_key_env": "EXAMPLE_API_KEY",
                "provider_model": "gpt-4o-mini",
                "max_in_flight": 8,
                "rpm": 500,
                "tpm": 200_000,
                "timeout_s": 30,
            }
        ),
        Settings(topic_prefix="t."),
    )
    hosted = fleet.pools["hosted"]
    assert hosted.remote is not None and fleet.pools["local"].remote is None
    assert hosted.remote.chat_url == "https://api.example.com/v1/chat/completions"
    assert (hosted.remote.api_key_env, hosted.remote.provider_model) == ("EXAMPLE_API_KEY", "gpt-4o-mini")
    assert (hosted.remote.max_in_flight, hosted.remote.rpm, hosted.remote.tpm) == (8, 500, 200_000)
    # its requests at once are the pool's batch: the caps' floor and the worker's prefetch
    assert hosted.max_batch == 8
    assert [p.name for p in fleet.pools_of("smol")] == ["local", "hosted"]


def test_a_local_server_needs_no_key_and_gets_defaults() -> None:
    fleet = parse_fleet(
        fleet_with({"base_url": "http://127.0.0.1:8080/v1", "provider_model": "llama"}), Settings(topic_prefix="t.")
    )
    remote = fleet.pools["hosted"].remote
    assert remote is not None and remote.api_key_env is None and remote.rpm is None
    assert remote.max_in_flight == DEFAULT_MAX_IN_FLIGHT


def test_every_mistake_is_one_line_and_a_pasted_key_is_never_repeated() -> None:
    secret = "sk-proj-THISISASECRETKEY1234567890"
    bad = fleet_with(
        {
            "base_url": "ftp://nowhere",
            "api_key_env": secret,
            "max_in_flight": 0,
            "rpm": 1.5,
            "timeout_s": "long",
            "max_batch": 4,
        },
        local={"provider_model": "gpt-4o", "base_url": "http://x"},
    )
    with pytest.raises(FleetError) as caught:
        parse_fleet(bad, Settings(topic_prefix="t."), "fleet.yaml")
    lines = str(caught.value).splitlines()
    assert secret not in str(caught.value)
    expected = [
        "pools.local.base_url: only for `engine: openai`",
        "pools.local.provider_model: only for `engine: openai`",
        "pools.hosted.base_url: expected the provider's http(s) URL",
        "pools.hosted.api_key_env: expected the NAME of an environment variable",
        "pools.hosted.provider_model: expected the model's name at the provider",
        "pools.hosted.max_in_flight: expected a whole number >= 1",
        "pools.hosted.rpm: expected a whole number >= 1",
        "pools.hosted.timeout_s: expected a number of seconds >= 0.1",
        "pools.hosted.max_batch: not for `engine: openai`",
    ]
    for start in expected:
        assert sum(line.startswith(f"fleet.yaml: {start}") for line in lines) == 1, (start, lines)
    assert len(lines) == len(expected), lines


def test_credentials_in_the_url_are_refused_without_repeating_them() -> None:
    with pytest.raises(FleetError) as caught:
        parse_fleet(
            fleet_with({"base_url": "https://user:hunter2@api.example.com/v1", "provider_model": "m"}),
            Settings(topic_prefix="t."),
        )
    assert "no credentials in the URL" in str(caught.value) and "hunter2" not in str(caught.value)
