"""Linear layers with oneDNN-packed weights, for float32 and bf16 models on the CPU.

PyTorch's plain `linear` hands the weight as stored to MKL's sgemm, which packs
its panels again on every call; oneDNN can keep it packed once, in its blocked
layout. On this 2-core AVX2 EPYC, SmolLM2-135M's 211 linears of one forward took
138 -> 99 ms at 16 rows, 173 -> 112 ms at 32 rows and 90 -> 62 ms at one row; 42
of its layer shapes on 2,400 rows (a prefill) 881 -> 742 ms. Results are the same
within float32 rounding (the summation order differs).

In bf16 (on CPUs with native bf16: AVX512-BF16 / AMX, where the workers pick it)
the gain is larger: on a 2-core AMX Xeon, SmolLM2-135M's layer shapes at 1 and 16
rows went from 49-108 to 27-57 us, about the same at 256-4,096 rows (a prefill); a
16-row decode step from about 100 to 86 ms, and the in-process engine on the
batching benchmark's 48 requests from 75-78 to 83-84 tokens/s.

CUDA keeps its own kernels; float16 is not packed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """`nn.Linear` with the weight kept in oneDNN's packed layout (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # an opaque oneDNN tensor: kept as a plain attribute, outside state_dict
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


PACKED_DTYPES = (torch.float32, torch.bfloat16)


def pack_linear_weights(model: Any) -> int:
    """Replaces every float32 or bf16 CPU `nn.Linear` in `model` by a PackedLinear;
    returns how many. The model is for inference from then on (no gradients, no
    saving). Pack bf16 only where the CPU runs it natively (`load_runner` decides)."""
    if not packing_available():
        return 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in PACKED_DTYPES
    ]
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, PackedLinear(child))
    return len(targets)
