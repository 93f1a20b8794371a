"""The CPU product of each Linear layer while decoding, chosen by what the CPU has.

Decoding multiplies a row or a few by every weight matrix, so its speed is how fast the weights stream
from memory, and which kernel streams them fastest depends on the CPU. For y = x Wᵀ + b, W (out, in):

    onednn   W packed once into oneDNN's blocked layout (PackedLinear): float32, and bfloat16 where oneDNN
             has bfloat16 arithmetic (AVX-512 with bfloat16, or AMX)
    half     bfloat16 where oneDNN has none (an AVX2-only CPU): W held as float16 for fbgemm's
             float16-weight kernel (HalfWeightLinear), which multiplies float32 activations and accumulates
             in float32. A bfloat16 weight differs from its float16 copy only below float16's normal range
             (|w| < 2⁻¹⁴, where float16 keeps fewer bits), so the product is the bfloat16 weights' to within
             ~1e-6 of each output; a weight outside float16's range keeps PyTorch's own linear.
    aten     nn.Linear as it is, where neither runs. PyTorch's own CPU linear takes another path for one
             row than for several (in float32 on MKL the bits differ), so it is never preferred to them.

kernel_for(dtype) is the first of candidates(dtype) in that order: the rule, measured on three CPUs
(docs/benchmarks.md#kernel-choices), and pinned by tests/inference/test_kernels.py. A short probe per
shape was tried instead and dropped: timings of a few milliseconds, the weights pushed out of the caches
as decoding reads them, ranked the kernels differently from run to run on a shared machine, and a
choice that changes between processes would change their bits. Each candidate computes a row's product
with the same bits alone as in a batch of any size, so the server's batching cannot change what a
request gets (test_kernels.py checks every candidate on the machine that runs the tests).
"""

from __future__ import annotations

import torch
from torch import nn

from ..torch_compat import (
    half_weight_available,
    half_weight_linear,
    onednn_bf16_supported,
    pack_half_weight,
    pack_linear_weight,
    packed_linear,
)

HALF_MAX = 65504.0  # float16's largest value


class PackedLinear(nn.Module):
    """nn.Linear's product with its weight packed once into oneDNN's blocked layout. Inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("packed_weight", pack_linear_weight(linear.weight), persistent=False)
        self.register_buffer("bias", linear.bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) → (..., out)
        return packed_linear(x, self.packed_weight, self.bias)


class HalfWeightLinear(nn.Module):
    """A bfloat16 nn.Linear's product through fbgemm's float16-weight kernel: float32 activations and
    accumulation, the result rounded to bfloat16 (see the module docstring). Inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.packed = pack_half_weight(linear.weight)
        self.out_features = linear.out_features
        bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
        self.register_buffer("bias", bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) → (..., out)
        rows = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        y = half_weight_linear(rows, self.packed, self.bias)  # (N, out)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def candidates(dtype: torch.dtype) -> list[str]:
    """The kernels that run dtype's products on this CPU with the same bits for a row alone as in any batch,
    in the order of preference (the module docstring); PyTorch's own linear only where there is none."""
    names = []
    if torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or (dtype == torch.bfloat16 and onednn_bf16_supported())
    ):
        names.append("onednn")
    if dtype == torch.bfloat16 and half_weight_available():
        names.append("half")
    return names or ["aten"]


def decoding_linear(linear: nn.Linear, kernel: str) -> nn.Module:
    """The module that computes linear's product with kernel; a weight outside float16's range keeps
    PyTorch's own linear rather than the half kernel."""
    if kernel == "half" and float(linear.weight.abs().max()) > HALF_MAX:
        kernel = "aten"
    if kernel == "aten":
        return linear
    return PackedLinear(linear) if kernel == "onednn" else HalfWeightLinear(linear)


def kernel_for(dtype: torch.dtype) -> str:
    """The kernel for dtype's products on this CPU (see the module docstring)."""
    return candidates(dtype)[0]
