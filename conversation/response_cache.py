"""Response cache: identical greedy requests are answered from Redis.

The key is a digest of everything that decides a greedy completion: the model,
the full prompt the model sees (system prompt, summary, kept turns) and
max_new_tokens. Sampled requests (temperature > 0) are never cached. Entries
expire after `response_cache_ttl_s`; 0 turns the cache off.

Each tenant has its own cache by default: a shared one would answer tenant B from
tenant A's earlier request, and `cache_hit` would tell B that somebody sent the same
prompt. `RESPONSE_CACHE_SHARED=true` shares it across tenants where that is wanted
(one organisation's teams, say).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from conversation.history import KEY_PREFIX, key_part


@dataclass(frozen=True, slots=True)
class CachedReply:
    text: str
    tokens_in: int
    tokens_out: int


def cacheable(temperature: float) -> bool:
    return temperature == 0


def cache_key(model: str, messages: Sequence[dict[str, str]], max_new_tokens: int, tenant: str | None) -> str:
    """The entry's key: per tenant, or shared across tenants where `tenant` is None."""
    material = orjson.dumps([model, list(messages), max_new_tokens])
    scope = "shared" if tenant is None else f"t:{key_part(tenant)}"
    return f"{KEY_PREFIX}resp:{scope}:{hashlib.blake2b(material, digest_size=20).hexdigest()}"


def lookup(client: Any, keys: Sequence[str]) -> list[CachedReply | None]:
    """One round trip for the whole batch."""
    if not keys:
        return []
    return [None if raw is None else CachedReply(**orjson.loads(raw)) for raw in client.mget(list(keys))]


def store(client: Any, entries: Sequence[tuple[str, CachedReply]], ttl_s: int) -> None:
    if not entries:
        return
    with client.pipeline(transaction=False) as pipe:
        for key, reply in entries:
            value = {"text": reply.text, "tokens_in": reply.tokens_in, "tokens_out": reply.tokens_out}
            pipe.set(key, orjson.dumps(value), ex=ttl_s)
        pipe.execute()
