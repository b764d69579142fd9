"""Packed CPU linears give nn.Linear's results, and a packed model generates the same text."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inference.kernels.packed_linear import PackedLinear, pack_linear_weights, packing_available
from inference.runners import Prompt, TransformersRunner, cpu_has_native_bf16, load_runner

pytestmark = pytest.mark.skipif(not packing_available(), reason="no oneDNN in this torch build")
native_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 is packed only where the CPU has it natively")


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(3, 7, 48)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-4, atol=1e-4)


@native_bf16
def test_only_cpu_float32_and_bf16_linears_are_packed() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 4).to(torch.float16))
    assert pack_linear_weights(net) == 2
    assert isinstance(net[0], PackedLinear) and isinstance(net[1], PackedLinear)
    assert type(net[2]) is nn.Linear


@native_bf16
def test_packed_bf16_linear_matches_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=2e-2, atol=2e-2)


def test_packed_model_generates_like_the_stock_one() -> None:
    stock = load_runner("tiny", torch_threads=1, optimized=False)
    packed = load_runner("tiny", torch_threads=1)
    assert isinstance(packed, TransformersRunner)
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    prompts = [Prompt([{"role": "user", "content": q}], 12) for q in ("rain?", "wind " * 40)]
    assert [g.text for g in packed.generate(prompts)] == [g.text for g in stock.generate(prompts)]
