"""Every PyTorch API gptlab uses that is private or recent, in one place.

gptlab needs torch >= TORCH_FLOOR (torch.optim.Muon arrived in 2.9) and is tested with the version
constraints.txt pins. The private names below (oneDNN's packed linear, the quantized and int4 CPU
kernels, an optimizer's group set-up, the compiler's static addresses, a tensor's version counter) can
change in any release: each is looked up here, when first used, so an upgrade that drops one fails in
one place with a message that names it and says what to install. tests/test_torch_compat.py checks that
no other module reaches for them.
"""

from __future__ import annotations

import warnings

import torch

TORCH_FLOOR = (2, 9)


class TorchVersionError(ImportError):
    """This PyTorch lacks what gptlab needs; the message says which API and what to install."""


def install_hint() -> str:
    return (
        f"gptlab needs torch >= {'.'.join(map(str, TORCH_FLOOR))} and is tested with the version in its "
        f"constraints.txt; install that (pip install -c constraints.txt torch), this is torch {torch.__version__}"
    )


def torch_version(version: str) -> tuple[int, int]:
    """'2.13.0+cpu' → (2, 13)."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_torch_version(version: str = torch.__version__) -> None:
    if torch_version(version) < TORCH_FLOOR:
        raise TorchVersionError(f"this is torch {version}, older than gptlab supports; {install_hint()}")


check_torch_version()


def private(owner: object, name: str, where: str) -> object:
    """owner.name, or a TorchVersionError naming `where` (how the code spells it) if this torch lacks it."""
    try:
        return getattr(owner, name)
    except (AttributeError, RuntimeError):  # torch.ops namespaces raise RuntimeError for an unknown op
        raise TorchVersionError(f"this PyTorch has no {where}, which gptlab uses; {install_hint()}") from None


# --- oneDNN's packed linear (CPU decoding, inference/decoder.py) ---


def onednn_bf16_supported() -> bool:
    return private(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", "torch.ops.mkldnn._is_mkldnn_bf16_supported")()


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's weight (out, in) in oneDNN's blocked layout, for packed_linear."""
    return private(torch.ops.mkldnn, "_reorder_linear_weight", "torch.ops.mkldnn._reorder_linear_weight")(weight, None)


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight from pack_linear_weight: (..., in) → (..., out)."""
    linear = private(torch.ops.mkldnn, "_linear_pointwise", "torch.ops.mkldnn._linear_pointwise")
    return linear(x, packed_weight, bias, "none", [], "")


# --- fbgemm's float16-weight linear (bfloat16 decoding where oneDNN has no bfloat16, inference/kernels.py) ---
# PyTorch 2.13 marks these deprecated (a warning once per process); while they exist they are a candidate.


def half_weight_available() -> bool:
    return (
        hasattr(torch, "fbgemm_pack_gemm_matrix_fp16")
        and torch.backends.quantized.supported_engines.count("fbgemm") > 0
    )


def pack_half_weight(weight: torch.Tensor) -> object:
    """nn.Linear's weight (out, in), as float16, packed for half_weight_linear."""
    pack = private(torch, "fbgemm_pack_gemm_matrix_fp16", "torch.fbgemm_pack_gemm_matrix_fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pack(weight.float())


def half_weight_linear(x: torch.Tensor, packed: object, bias: torch.Tensor) -> torch.Tensor:
    """float32 x (rows, in) times the packed float16 weight, accumulated in float32, plus bias: (rows, out)."""
    linear = private(
        torch, "fbgemm_linear_fp16_weight_fp32_activation", "torch.fbgemm_linear_fp16_weight_fp32_activation"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return linear(x, packed, bias)


# --- fbgemm's int8 linear (inference/quantize.py) ---


def int8_prepack(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> object:
    """Pack int8 weights q (out, in) with per-row scales (out,) for int8_linear."""
    make = private(torch, "_make_per_channel_quantized_tensor", "torch._make_per_channel_quantized_tensor")
    with warnings.catch_warnings():  # quantized tensors are deprecated, yet they are this kernel's only input format
        warnings.simplefilter("ignore", UserWarning)
        weight = make(q, scales.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
    return private(torch.ops.quantized, "linear_prepack", "torch.ops.quantized.linear_prepack")(weight, bias)


def int8_unpack(packed: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What int8_prepack packed: q (out, in) int8, the scales (out,) and the bias, float32."""
    weight, bias = private(torch.ops.quantized, "linear_unpack", "torch.ops.quantized.linear_unpack")(packed)
    return weight.int_repr(), weight.q_per_channel_scales().float(), bias


def int8_linear_dynamic(x: torch.Tensor, packed: object) -> torch.Tensor:
    """x (..., in) float32, rounded to 7-bit codes with one scale for the whole call, times the packed int8
    weights, plus their bias: (..., out) float32. 7 bits (reduce_range): PyTorch's x86 engine needs them
    on CPUs without VNNI, whose 16-bit intermediate sums would saturate."""
    return private(torch.ops.quantized, "linear_dynamic", "torch.ops.quantized.linear_dynamic")(x, packed, True)


# --- the int4 CPU kernel (inference/quantize.py) ---


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """int4 codes (out, in) int32 in [0, 15] packed for int4_mm: (out, in / 2) uint8."""
    name = "_convert_weight_to_int4pack_for_cpu"
    return private(torch, name, f"torch.{name}")(q, 1)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_offsets: torch.Tensor) -> torch.Tensor:
    """x (N, in) bfloat16 times int4_pack's weights: (N, out) bfloat16."""
    name = "_weight_int4pack_mm_for_cpu"
    return private(torch, name, f"torch.{name}")(x, packed, group_size, scales_and_offsets)


# --- the rest ---


def muon_class() -> type:
    """torch.optim.Muon, whose `_init_group` BatchedMuon calls (training/optimizers.py)."""
    muon = private(torch.optim, "Muon", "torch.optim.Muon")
    private(muon, "_init_group", "torch.optim.Muon._init_group")
    return muon


def muon_init_group(optimizer: torch.optim.Optimizer, group: dict, params: list, grads: list, buffers: list) -> None:
    """Muon's own set-up of one parameter group: fills params, grads and momentum buffers, makes state."""
    private(optimizer, "_init_group", "torch.optim.Muon._init_group")(group, params, grads, buffers)


def checkpoint_wrapper(module: torch.nn.Module) -> torch.nn.Module:
    """The module, its activations recomputed in backward instead of kept (torch's wrapper, for FSDP)."""
    try:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap
    except ImportError:
        raise TorchVersionError(
            "this PyTorch has no torch.distributed.algorithms._checkpoint.checkpoint_wrapper, "
            f"which gptlab uses; {install_hint()}"
        ) from None
    return wrap(module)


def mark_static_address(tensor: torch.Tensor) -> None:
    """Tell torch.compile a tensor keeps its address, so a CUDA graph reads it in place."""
    private(torch._dynamo, "mark_static_address", "torch._dynamo.mark_static_address")(tensor)


def version_counter(tensor: torch.Tensor) -> int:
    """The tensor's version counter, bumped by every in-place change."""
    return private(tensor, "_version", "Tensor._version")
