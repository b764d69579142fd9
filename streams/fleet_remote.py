"""A pool whose engine is a remote OpenAI-compatible server (`engine: openai`).

    pools:
      hosted:
        engine: openai
        base_url: https://api.openai.com/v1     # where /chat/completions is
        api_key_env: OPENAI_API_KEY              # the NAME of the variable holding the key
        provider_model: gpt-4o-mini              # sent as `model`
        max_in_flight: 16                        # requests at the provider at once, per worker
        rpm: 500                                 # optional: the account's requests per minute
        tpm: 200000                              # optional: its tokens per minute
        timeout_s: 60                            # optional: the longest wait for a byte
        models: [smol]

The key itself is never in the fleet file, the logs, `dev.json` or any state file:
only the variable's name is, and a worker of the pool reads the variable when it
starts (a local server without keys needs no `api_key_env`). `rpm` and `tpm` are the
provider's limits for the whole pool: each worker paces itself to its share (the
limit over the pool's members, from its PressureState). Checked with the rest of the
fleet file, one line per mistake; a value that may be a key is never repeated in one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

OPENAI_ENGINE = "openai"
REMOTE_KEYS = {"base_url", "api_key_env", "provider_model", "max_in_flight", "rpm", "tpm", "timeout_s"}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
DEFAULT_MAX_IN_FLIGHT = 16
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """Where a remote pool's requests go, and how many at once."""

    base_url: str  # without a trailing slash: `<base_url>/chat/completions`
    provider_model: str
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    api_key_env: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"


def parse_remote(body: dict[str, Any], where: str, engine: str, mistakes: list[str]) -> RemoteSpec | None:
    """The remote engine's settings of a pool's `body` (None unless `engine: openai`);
    each mistake appended to `mistakes` as one line."""
    if engine != OPENAI_ENGINE:
        for key in sorted(REMOTE_KEYS & set(body)):
            mistakes.append(f"{where}.{key}: only for `engine: {OPENAI_ENGINE}`")
        return None
    base_url = body.get("base_url")
    parts = urlsplit(base_url) if isinstance(base_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        mistakes.append(f"{where}.base_url: expected the provider's http(s) URL, e.g. https://api.openai.com/v1")
        base_url = "http://invalid"
    elif parts.username or parts.password:
        mistakes.append(f"{where}.base_url: no credentials in the URL (name the key's variable in api_key_env)")
    env = body.get("api_key_env")
    if env is not None and not (isinstance(env, str) and ENV_NAME.fullmatch(env)):
        # never echoed: a key pasted here instead of its variable's name must not reach a log
        mistakes.append(
            f"{where}.api_key_env: expected the NAME of an environment variable holding the key "
            "(letters, digits, '_', e.g. OPENAI_API_KEY), never the key itself"
        )
        env = None
    model = body.get("provider_model")
    if not isinstance(model, str) or not model.strip() or len(model) > 256:
        mistakes.append(f"{where}.provider_model: expected the model's name at the provider (sent as `model`)")
        model = ""
    numbers: dict[str, Any] = {}
    for key, least, default, kind in (
        ("max_in_flight", 1, DEFAULT_MAX_IN_FLIGHT, int),
        ("rpm", 1, None, int),
        ("tpm", 1, None, int),
        ("timeout_s", 0.1, DEFAULT_TIMEOUT_S, float),
    ):
        value = body.get(key, default)
        ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value >= least)
        if ok and kind is int and value is not None:
            ok = isinstance(value, int)
        if not ok:
            what = "a whole number" if kind is int else "a number of seconds"
            mistakes.append(f"{where}.{key}: expected {what} >= {least:g}")
            value = default
        numbers[key] = value
    if "max_batch" in body:
        mistakes.append(f"{where}.max_batch: not for `engine: {OPENAI_ENGINE}` (max_in_flight bounds its requests)")
    return RemoteSpec(
        str(base_url).rstrip("/"),
        model,
        int(numbers["max_in_flight"]),
        env,
        numbers["rpm"],
        numbers["tpm"],
        float(numbers["timeout_s"]),
    )
