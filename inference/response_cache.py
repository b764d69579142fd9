"""Response cache: identical greedy requests are answered from Redis.

The key is a digest of everything that decides a greedy completion: the model,
the full prompt the model sees (system prompt, summary, kept turns) and
max_new_tokens. Sampled requests (temperature > 0) are never cached. Entries
expire after `response_cache_ttl_s`; 0 turns the cache off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import orjson

from inference.models import Generation, Prompt
from processors.history import KEY_PREFIX


def cacheable(prompt: Prompt) -> bool:
    return prompt.temperature == 0


def cache_key(model: str, prompt: Prompt) -> str:
    material = orjson.dumps([model, prompt.messages, prompt.max_new_tokens])
    return f"{KEY_PREFIX}resp:{hashlib.blake2b(material, digest_size=20).hexdigest()}"


def lookup(client: Any, keys: Sequence[str]) -> list[Generation | None]:
    """One round trip for the whole batch."""
    if not keys:
        return []
    return [None if raw is None else Generation(**orjson.loads(raw)) for raw in client.mget(list(keys))]


def store(client: Any, entries: Sequence[tuple[str, Generation]], ttl_s: int) -> None:
    if not entries:
        return
    with client.pipeline(transaction=False) as pipe:
        for key, g in entries:
            value = {"text": g.text, "tokens_in": g.tokens_in, "tokens_out": g.tokens_out}
            pipe.set(key, orjson.dumps(value), ex=ttl_s)
        pipe.execute()
