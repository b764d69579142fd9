"""Continuous batching: sequences join the running batch at the next step and leave when done.

One KV cache holds every active sequence, one row each. Rows are left-padded to a
common length; the attention mask marks which cache columns are real, and every row
carries its own position ids, so a row may have holes (padding between a shared
prefix and its own tokens, or before a row that joined later). Per step:

- `add()` prefills new sequences (grouped by shared prefix; a cached prefix's KV is
  reused and only the rest is computed), samples their first token, and merges
  their cache rows into the running cache;
- `step()` runs one decode step for all active rows and returns those that ended
  (end-of-turn token or max_new_tokens); their rows are dropped, and cache columns
  that only finished rows used are trimmed.

Static batching (transformers' `generate` on a whole batch) is in `runners.py`; the
worker picks one with `TIDEGATE_BATCHING`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from inference.kernels.kv_cache import roomy_cache
from inference.prefix_cache import PrefixCache, PrefixKV


@dataclass(eq=False)
class Request:
    """One sequence to generate; `tag` is the caller's handle, returned untouched."""

    tag: Any
    ids: list[int]  # the whole prompt, chat template applied
    max_new_tokens: int
    temperature: float = 0.0
    prefix_len: int = 0  # leading tokens shared with other requests (their KV may be cached)
    out: list[int] = field(default_factory=list)
    admitted_at: float = 0.0


@dataclass(slots=True)
class EngineStats:
    """Counters for `tidegate bench batching` and the worker's stats: padding counts
    prompt positions computed for nothing, and cache columns attended for nothing."""

    steps: int = 0
    rows_stepped: int = 0  # sum of batch sizes over decode steps
    prefill_tokens: int = 0  # real prompt tokens computed
    prefill_padded: int = 0  # padding positions computed in prefill
    prefix_reused: int = 0  # prompt tokens taken from the prefix cache instead
    kv_real: int = 0  # real cache columns attended, summed over decode steps
    kv_padded: int = 0  # padding cache columns attended, summed over decode steps
    rows_idle: int = 0  # decode slots of rows that had already ended (static batching only)

    def padding_share(self) -> float:
        """Of the token positions the model computed, the share that was padding: prompt
        padding, and rows a static batch carries after they ended."""
        total = self.prefill_tokens + self.prefill_padded + self.rows_stepped
        return (self.prefill_padded + self.rows_idle) / total if total else 0.0

    def kv_padding_share(self) -> float:
        """Of the cache columns decode steps attended to, the share that was padding."""
        total = self.kv_real + self.kv_padded
        return self.kv_padded / total if total else 0.0

    def mean_batch(self) -> float:
        return self.rows_stepped / self.steps if self.steps else 0.0


class ContinuousEngine:
    def __init__(
        self,
        model: Any,
        end_ids: Sequence[int],
        pad_id: int,
        device: str,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.end_ids = torch.tensor(sorted(set(end_ids)), device=device)
        self.pad_id = pad_id
        self.device = device
        self.prefix_cache = prefix_cache
        self.stats = EngineStats()
        self.active: list[Request] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self._next_pos = torch.zeros(0, dtype=torch.long, device=device)
        self._last = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def reset(self) -> list[Request]:
        """Drops the running batch (after a model failure); returns what was in it."""
        dropped, self.active = self.active, []
        self._cache = None
        self._mask = self._mask[:0, :0]
        return dropped

    def add(self, requests: Sequence[Request]) -> list[Request]:
        """Prefills `requests` and joins them to the running batch; returns those that
        already ended on their first token."""
        if not requests:
            return []
        now = time.monotonic()
        for r in requests:
            r.admitted_at = now
        groups: dict[tuple[int, ...], list[Request]] = {}
        for r in requests:
            prefix = tuple(r.ids[: r.prefix_len]) if self.prefix_cache is not None and r.prefix_len else ()
            groups.setdefault(prefix, []).append(r)
        finished: list[Request] = []
        for prefix, group in groups.items():
            finished.extend(self._prefill(group, self.prefix_cache.get(prefix, self._compute) if prefix else None))
        return finished

    def step(self) -> list[Request]:
        """One decode step for every active row; returns the requests that ended."""
        if not self.active:
            return []
        rows = len(self.active)
        self._mask = torch.cat([self._mask, self._mask.new_ones((rows, 1))], dim=1)
        real = sum(len(r.ids) + len(r.out) for r in self.active)  # counted here: no device sync
        self.stats.steps += 1
        self.stats.rows_stepped += rows
        self.stats.kv_real += real
        self.stats.kv_padded += rows * self._mask.shape[1] - real
        with torch.inference_mode():
            logits = self.model(
                input_ids=self._last.unsqueeze(1),
                attention_mask=self._mask,
                position_ids=self._next_pos.unsqueeze(1),
                past_key_values=self._cache,
                use_cache=True,
            ).logits[:, -1, :]
        self._next_pos = self._next_pos + 1
        self._last = self._sample(logits, self.active)
        return self._record(0)

    # -- prefill --------------------------------------------------------------

    def _compute(self, prefix: Sequence[int]) -> PrefixKV:
        """KV of a shared prefix, computed once (batch of one) for the prefix cache."""
        ids = torch.tensor([list(prefix)], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.stats.prefill_tokens += len(prefix)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _prefill(self, group: list[Request], prefix: PrefixKV | None) -> list[Request]:
        start = group[0].prefix_len if prefix is not None else 0
        tails = [r.ids[start:] for r in group]
        width = max(len(t) for t in tails)
        rows = len(group)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        tail_mask = torch.zeros((rows, width), dtype=torch.long)
        positions = torch.full((rows, width), start, dtype=torch.long)
        for i, t in enumerate(tails):
            ids[i, width - len(t) :] = torch.tensor(t)
            tail_mask[i, width - len(t) :] = 1
            positions[i, width - len(t) :] = torch.arange(start, start + len(t))
        ids, tail_mask, positions = (x.to(self.device) for x in (ids, tail_mask, positions))
        cache = roomy_cache()
        mask = tail_mask
        if prefix is not None:
            for layer, (k, v) in enumerate(prefix):
                cache.update(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous(), layer)
            mask = torch.cat([tail_mask.new_ones((rows, start)), tail_mask], dim=1)
            self.stats.prefix_reused += start * rows
        real = sum(len(t) for t in tails)
        self.stats.prefill_tokens += real
        self.stats.prefill_padded += rows * width - real
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        tokens = self._sample(out.logits[:, -1, :], group)
        first = len(self.active)
        self._merge(group, out.past_key_values, mask, positions[:, -1] + 1, tokens)
        return self._record(first)

    def _merge(
        self,
        group: list[Request],
        cache: DynamicCache,
        mask: torch.Tensor,
        next_pos: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        """Joins new rows to the running cache, left-padding the shorter side."""
        if self._cache is None or not self.active:
            self._cache, self._mask, self._next_pos, self._last = cache, mask, next_pos, tokens
            self.active = list(group)
            return
        old, new = self._mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)
        self._next_pos = torch.cat([self._next_pos, next_pos])
        self._last = torch.cat([self._last, tokens])
        self.active.extend(group)

    # -- sampling and retirement ----------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: Sequence[Request]) -> torch.Tensor:
        # max's indices, not argmax: the same token (the first maximum, ties included),
        # but on the CPU argmax over a 49,152-word vocabulary is not vectorised: 16 rows
        # took 2,945 us in bf16 (1,205 in float32) against 646 (481) on one thread; with
        # the tiny model that was 47% of a worker's time in py-spy
        greedy = logits.max(dim=-1).indices
        temps = [r.temperature for r in rows]
        if not any(t > 0 for t in temps):
            return greedy
        t = torch.tensor(temps, device=logits.device, dtype=torch.float32).clamp(min=1e-5).unsqueeze(1)
        sampled = torch.multinomial(torch.softmax(logits.float() / t, dim=-1), 1).squeeze(1)
        return torch.where(t.squeeze(1) > 1e-5, sampled, greedy)

    def _record(self, first: int) -> list[Request]:
        """Appends each row's newest token (rows from `first` on), then drops the rows
        that ended: on an end-of-turn token (not kept) or at max_new_tokens."""
        newest = self._last[first:]
        last, ended = torch.stack([newest, torch.isin(newest, self.end_ids).long()]).tolist()  # one sync
        finished: list[Request] = []
        for r, token, is_end in zip(self.active[first:], last, ended, strict=True):
            if not is_end:
                r.out.append(token)
            if is_end or len(r.out) >= r.max_new_tokens:
                finished.append(r)
        if finished:
            done = {id(r) for r in finished}
            self._retain([i for i, r in enumerate(self.active) if id(r) not in done])
        return finished

    def drop(self, requests: list[Request]) -> None:
        """Takes `requests` out of the running batch (their callers went away): the
        next step runs without their rows."""
        gone = {id(r) for r in requests}
        self._retain([i for i, r in enumerate(self.active) if id(r) not in gone])

    def _retain(self, keep: list[int]) -> None:
        self.active = [self.active[i] for i in keep]
        if not keep:
            self._cache = None
            self._mask = self._mask[:0, :0]
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        self._next_pos = self._next_pos[index]
        self._last = self._last[index]
        cut = int((self._mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading columns no row uses
        self._mask = self._mask[:, cut:]
        assert self._cache is not None
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, cut:, :]
            layer.values = layer.values[index, :, cut:, :]


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - x.shape[2]
    if not missing:
        return x
    return torch.cat([x.new_zeros((x.shape[0], x.shape[1], missing, x.shape[3])), x], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1) if missing else mask
