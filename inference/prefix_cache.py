"""KV cache of shared prompt prefixes (a service's system prompt, typically).

Requests that start with the same tokens share their KV: it is computed once and
each later request prefills only its own tokens. Entries are kept least recently
used first out, `entries` at most and `max_bytes` of KV at most (a long system
prompt's KV is layers x 2 x heads x tokens x head_dim elements, megabytes on a real
model: a count alone does not bound the memory); prefixes shorter than
`min_tokens` are not worth a cache row and are computed with the rest of the prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

PrefixKV = list[tuple[Any, Any]]  # per layer: keys, values of shape (1, heads, prefix, head_dim)


def kv_bytes(kv: PrefixKV) -> int:
    """Bytes held by one entry's tensors."""
    return sum(t.numel() * t.element_size() for layer in kv for t in layer)


class PrefixCache:
    def __init__(self, entries: int = 8, min_tokens: int = 16, max_bytes: int = 256 << 20) -> None:
        self.entries = entries
        self.min_tokens = min_tokens
        self.max_bytes = max_bytes
        self._kv: OrderedDict[tuple[int, ...], PrefixKV] = OrderedDict()
        self._sizes: dict[tuple[int, ...], int] = {}
        self.bytes = 0
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
        size = kv_bytes(kv)
        if size > self.max_bytes:
            return kv  # larger than the whole cache: used once, not kept
        self._kv[prefix], self._sizes[prefix] = kv, size
        self.bytes += size
        while len(self._kv) > self.entries or self.bytes > self.max_bytes:
            old, _ = self._kv.popitem(last=False)
            self.bytes -= self._sizes.pop(old)
        return kv
