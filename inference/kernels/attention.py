"""Decode-step attention for grouped-query models without copying the KV cache.

transformers' `sdpa` path expands keys and values to every query head
(`repeat_kv`) whenever a mask is passed, i.e. always in a padded batch: for
SmolLM2-135M (9 query heads on 3 KV heads), 16 rows of 430 cached tokens, that
copy alone was about 80 ms of a 380 ms CPU decode step, and SDPA's CPU kernel
another 90. With one query token per row the attention is two small batched
matmuls per KV head group instead, read straight from the cache.

In bf16 on the CPU the batched matmuls copy a cache view with spare columns (the
roomy cache's, inference/kv_cache.py) to a contiguous tensor first: on a 2-core
AMX Xeon, 16 rows of 432 columns, QK^T took 674 us a layer against 139 us on a
contiguous cache. There PyTorch's own SDPA with `enable_gqa` (its flash kernel
reads the strided view and the grouped heads in place) is used instead: 504 us
for both matmuls against 980. In float32 the matmuls take the view as it is
(284 + 189 us against SDPA's 687) and stay.

Prefill (more than one query token) and models without grouped heads keep the
`sdpa` path unchanged. `use_grouped_decode(model)` switches a loaded model over;
the mask is built exactly as for `sdpa` (a boolean (rows, 1, 1, columns) mask).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "tidegate_grouped_decode"


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(rows, heads, 1, dim) queries against (rows, kv_heads, columns, dim) keys and
    values; returns (rows, 1, heads, dim) like `sdpa_attention_forward`."""
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or kv_heads == heads or dropout:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scale = dim**-0.5 if scaling is None else scaling
    if query.dtype != torch.float32 and query.device.type == "cpu":
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=True
        )  # (rows, heads, 1, dim)
        return out.transpose(1, 2), None
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).mul_(scale)  # (rows, kv_heads, group, columns)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores.add_(attention_mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # (rows, kv_heads, group, dim)
    return out.reshape(rows, 1, heads, dim), None


def use_grouped_decode(model: Any) -> None:
    """Registers the attention (once) and switches `model` to it."""
    AttentionInterface.register(NAME, grouped_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
