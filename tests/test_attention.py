"""The grouped decode attention against transformers' sdpa path (which repeats KV heads)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from inference.kernels.attention import grouped_decode_attention


class _Heads(nn.Module):
    num_key_value_groups = 3
    is_causal = True


def test_matches_sdpa_with_padding_mask() -> None:
    torch.manual_seed(0)
    rows, kv_heads, columns, dim = 4, 2, 37, 16
    query = torch.randn(rows, kv_heads * 3, 1, dim)
    key = torch.randn(rows, kv_heads, columns + 5, dim)[:, :, :columns]  # a view, like the roomy cache's
    value = torch.randn(rows, kv_heads, columns, dim)
    mask = torch.ones(rows, 1, 1, columns, dtype=torch.bool)
    mask[1, ..., :20] = False  # left padding of different widths
    mask[3, ..., :1] = False
    expected, _ = sdpa_attention_forward(_Heads(), query, key, value, mask, scaling=dim**-0.5)
    got, _ = grouped_decode_attention(_Heads(), query, key, value, mask, scaling=dim**-0.5)
    assert got.shape == expected.shape == (rows, 1, kv_heads * 3, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_decode_matches_sdpa_on_a_cache_view() -> None:
    """bf16 on the CPU goes through PyTorch's SDPA with grouped heads (no copy of the view)."""
    torch.manual_seed(2)
    rows, kv_heads, columns, dim = 3, 2, 29, 16
    query = torch.randn(rows, kv_heads * 3, 1, dim).to(torch.bfloat16)
    key = torch.randn(rows, kv_heads, columns + 7, dim).to(torch.bfloat16)[:, :, :columns]
    value = torch.randn(rows, kv_heads, columns + 7, dim).to(torch.bfloat16)[:, :, :columns]
    mask = torch.ones(rows, 1, 1, columns, dtype=torch.bool)
    mask[0, ..., :11] = False
    expected, _ = sdpa_attention_forward(_Heads(), query, key, value, mask, scaling=dim**-0.5)
    got, _ = grouped_decode_attention(_Heads(), query, key, value, mask, scaling=dim**-0.5)
    assert got.shape == expected.shape == (rows, 1, kv_heads * 3, dim)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_prefill_keeps_the_sdpa_path() -> None:
    torch.manual_seed(1)
    query = torch.randn(2, 6, 5, 8)
    key, value = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    expected, _ = sdpa_attention_forward(_Heads(), query, key, value, None)
    got, _ = grouped_decode_attention(_Heads(), query, key, value, None)
    torch.testing.assert_close(got, expected)
