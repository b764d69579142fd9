"""A KV cache whose layers grow in place, for the continuous-batching engine.

transformers' DynamicLayer concatenates every new token onto its keys and values,
copying the whole cache at every decode step (on this CPU, with 16 rows of 600
tokens, that is about 440 MB per step for SmolLM2-135M). Here each layer keeps
`SPARE` free columns: a step writes one column in place, and the cache is copied
only when the spare room runs out, or when rows join or leave (the engine assigns
`keys`/`values` then, which re-allocates with room).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE = 64  # free columns kept after each re-allocation


class RoomyLayer(DynamicLayer):
    def __init__(self, **kwargs: object) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._length = 0  # columns in use, the same in both
        self._v_length = 0  # kept apart while `keys` and `values` are assigned one after the other
        super().__init__(**kwargs)

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor:
        assert self._k is not None
        return self._k[:, :, : self._length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k, self._length = _with_room(value)

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor:
        assert self._v is not None
        return self._v[:, :, : self._v_length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v, self._v_length = _with_room(value)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if self._k is None or self._k.dim() != 4:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        new = key_states.shape[2]
        assert self._v is not None
        if self._length + new > self._k.shape[2]:
            self.keys, self.values = torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)
            return self.keys, self.values
        self._k[:, :, self._length : self._length + new] = key_states
        self._v[:, :, self._length : self._length + new] = value_states
        self._length += new
        self._v_length += new
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length


def _with_room(x: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """A copy of `x` with SPARE free columns after its own, and how many are in use."""
    if x is None or x.dim() != 4:
        return x, 0
    b, h, length, d = x.shape
    buffer = x.new_empty((b, h, length + SPARE, d))
    buffer[:, :, :length] = x
    return buffer, length


def roomy_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = RoomyLayer
    return cache
