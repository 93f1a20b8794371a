"""Int8 and int4 weights for CPU decoding, multiplied by kernels that PyTorch ships.

Decoding a few rows at a time is bound by how fast the weights stream from memory, so storing them in
fewer bits makes each step faster, provided the kernel that multiplies by them keeps up.

    int8: row r of a weight W (out, in) is stored as q[r] = round(W[r] / s[r]) in [-127, 127] with
          s[r] = max|W[r]| / 127 (symmetric, one scale per output channel), so W ≈ q·s.
    int4: each group of INT4_GROUP_SIZE consecutive inputs of a row has its own scale s and offset z
          (the layout of PyTorch's int4 kernel): W ≈ (q - 8)·s + z with q in [0, 15].

quantize_model swaps every Linear layer (attention qkv and out_proj, feed-forward fc and proj, the
output head) for one of these; embeddings and LayerNorms stay float.

Which kernel: benchmarks/quantize_kernels.py times every candidate on GPT-2 124M's five matrix shapes
at 1, 8 and 128 rows (docs/benchmarks.md#kernel-choices has the figures). int8: PyTorch's dynamic int8
Linear (fbgemm, the kernel behind torch.ao's quantize_dynamic), which rounds the activations to 8 bits
too, so the multiply runs on integers; it was the fastest int8 kernel in nearly every cell. int4:
torch's CPU int4 kernel with groups of 32 inputs, as fast as larger groups and the most accurate.
One kernel per mode therefore serves every shape: KERNELS below.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..model import GPTModel
from ..torch_compat import int4_mm, int4_pack, int8_linear_dynamic, int8_prepack, int8_unpack

INT4_GROUP_SIZE = 32  # the CPU int4 kernel accepts 32, 64, 128 or 256
INT4_ROWS_MULTIPLE = 16  # ... and packs output rows in blocks of 16


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (out, in) float → q (out, in) int8 and scales (out,) in scale_dtype.

    The scales are rounded to scale_dtype before q is computed, so that q·scales is exactly the weight
    the kernel multiplies by (a bfloat16 scale rounded afterwards would stretch each row by up to 0.4%).
    """
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)  # (out,)
    q = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_groups(
    weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of inputs: (out, in) float → q (out, in) int32 in [0, 15], and scales and
    offsets (out, in / group_size) in scale_dtype, such that W ≈ (q - 8)·scale + offset group by group."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)  # (out, G, g)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, G)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    offsets = (low + 8 * scales.float()).to(scale_dtype)  # the value of code 8, so that code 0 is `low`
    codes = (groups - offsets.float()[..., None]) / scales.float()[..., None] + 8
    q = torch.round(codes).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    return q, scales, offsets


def float32_bias(linear: nn.Linear) -> torch.Tensor | None:
    """A copy of the layer's bias in float32 (quantized layers keep it so), or None."""
    return None if linear.bias is None else linear.bias.detach().float().clone()


class QuantizedLinear(nn.Module):
    """A Linear layer with integer weights: (..., in) → (..., out) in the input's dtype; the bias stays
    float32. Subclasses give forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DynamicInt8Linear(QuantizedLinear):
    """PyTorch's dynamic int8 Linear (fbgemm on x86; the kernel behind torch.ao's quantize_dynamic).

    Each call also rounds its input to 8 bits, with one scale for the whole (N, in) input, and then
    multiplies integers. So the rows of one call share that scale: a row's result depends a little on
    the other rows of its batch. Rounding each row on its own (its own scale, through the same kernel)
    made decoding much slower (docs/benchmarks.md), so the scale stays shared and the docs say so.
    Only the prepacked weight and bias are kept (the engine's own layout), and the kernel adds the bias.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scales = quantize_rows(linear.weight)
        self.packed = int8_prepack(q, scales, float32_bias(linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) goes in as it is: reshapes around the call cost time at batch 1 (docs/benchmarks.md)
        return int8_linear_dynamic(x.float(), self.packed).to(x.dtype)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the packing holds: q (out, in) int8, per-row scales (out,) and the bias (out,) or None, float32."""
        return int8_unpack(self.packed)


class Int4Linear(QuantizedLinear):
    """torch._weight_int4pack_mm_for_cpu with bfloat16 activations (float32 ones make it 10-100x slower).

    The kernel packs output rows in blocks of 16, so the weight gets zero rows up to a multiple of 16
    (GPT-2's 50,257-token head: 50,272 rows) whose outputs are cut off.
    """

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__(linear)
        self.register_buffer("bias", float32_bias(linear))
        self.group_size = group_size
        weight = F.pad(linear.weight.detach().float(), (0, 0, 0, -self.out_features % INT4_ROWS_MULTIPLE))  # (out', in)
        q, scales, offsets = quantize_groups(weight, group_size)
        self.register_buffer("weight_int4", int4_pack(q))  # (out', in / 2) uint8
        scales_and_offsets = torch.stack([scales, offsets], dim=-1).transpose(0, 1)  # (G, out', 2), as the kernel wants
        self.register_buffer("scales_and_offsets", scales_and_offsets.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (N, in)
        y = int4_mm(rows, self.weight_int4, self.group_size, self.scales_and_offsets)
        y = y[:, : self.out_features].float()  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


# mode → the module that replaces each nn.Linear (see the module docstring for why one serves every shape)
KERNELS = {
    "int8": DynamicInt8Linear,
    "int4": partial(Int4Linear, group_size=INT4_GROUP_SIZE),
}


def is_quantized(model: nn.Module) -> bool:
    """Whether the model holds quantized layers (it then decodes as it is: no float copy can be made of it)."""
    return any(isinstance(module, QuantizedLinear) for module in model.modules())


@torch.no_grad()
def quantize_model(model: GPTModel, mode: str) -> GPTModel:
    """An eval-mode copy of the model (on the CPU) whose Linear layers hold `mode` weights: "int8" or "int4".

    The original is left as it is. The copy shares the float tensors it keeps (embeddings, LayerNorms)
    with it, so it costs only the quantized weights; a tied output head gets its own quantized copy of
    the token embedding. Convert the model to the dtype it should decode in (float32 or bfloat16)
    before quantizing: the integer layers return their input's dtype.
    """
    if mode not in KERNELS:
        raise UserError(f"quantize must be one of {', '.join(KERNELS)}, got {mode!r}")
    if model.device.type != "cpu":
        raise UserError(
            f"the quantized kernels run on the CPU, but the model is on {model.device.type}; "
            "load it with --device cpu to quantize it"
        )
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if mode == "int4":
        for name, linear in linears.items():
            if linear.in_features % INT4_GROUP_SIZE:
                raise UserError(
                    f"int4 quantizes groups of {INT4_GROUP_SIZE} inputs, but {name} has "
                    f"{linear.in_features} inputs; use int8 for this model"
                )
    shared = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    quantized = copy.deepcopy(model, memo=shared)  # new modules, the same tensors
    for name, linear in linears.items():
        parent, _, attribute = name.rpartition(".")
        setattr(quantized.get_submodule(parent), attribute, KERNELS[mode](linear))
    return quantized.eval()
