"""KV cache of shared prompt prefixes (a service's system prompt, typically).

Requests that start with the same tokens share their KV: it is computed once and
each later request prefills only its own tokens. Entries are kept least recently
used first out, `entries` at most; prefixes shorter than `min_tokens` are not worth
a cache row and are computed with the rest of the prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

PrefixKV = list[tuple[Any, Any]]  # per layer: keys, values of shape (1, heads, prefix, head_dim)


class PrefixCache:
    def __init__(self, entries: int = 8, min_tokens: int = 16) -> None:
        self.entries = entries
        self.min_tokens = min_tokens
        self._kv: OrderedDict[tuple[int, ...], PrefixKV] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, prefix: tuple[int, ...], compute: Callable[[Sequence[int]], PrefixKV]) -> PrefixKV:
        kv = self._kv.get(prefix)
        if kv is not None:
            self._kv.move_to_end(prefix)
            self.hits += 1
            return kv
        self.misses += 1
        kv = compute(prefix)
        self._kv[prefix] = kv
        while len(self._kv) > self.entries:
            self._kv.popitem(last=False)
        return kv
