"""The CPU decoding kernels: each computes the reference product and serves every row count alike, and the
rule gives each kind of CPU its kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptlab.inference import kernels
from gptlab.inference.kernels import (
    HalfWeightLinear,
    PackedLinear,
    candidates,
    decoding_linear,
    kernel_for,
)

KINDS = {"aten": nn.Linear, "onednn": PackedLinear, "half": HalfWeightLinear}


def random_linear(out_features: int, in_features: int, dtype: torch.dtype, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
        linear.weight[0, :8] = torch.tensor([1e-6, -3e-7, 2e-5, 0.5, -1.5, 4.0, 1e-9, 0.0])  # float16's edges
    return linear.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_every_candidate_computes_the_product_and_serves_every_row_count(dtype, bias):
    for kernel in candidates(dtype):
        linear = random_linear(96, 64, dtype, bias)
        module = decoding_linear(linear, kernel)
        assert type(module) is KINDS[kernel]
        x = torch.randn(9, 64).to(dtype)
        with torch.inference_mode():
            batch = module(x)
            # the float32 product of the dtype's own weights and inputs
            expected = torch.nn.functional.linear(
                x.float(), linear.weight.float(), None if not bias else linear.bias.float()
            )
            tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-3)
            assert batch.dtype == dtype and torch.allclose(batch.float(), expected, **tolerance), kernel
            for rows in (1, 2, 3, 8):
                assert torch.equal(module(x[:rows]), batch[:rows]), (kernel, rows)
            assert torch.equal(module(x[None, 4:7]), batch[None, 4:7]), kernel  # (B, T, C), as a prefill passes it


def test_the_half_kernel_rounds_only_its_output_in_bfloat16():
    """Float32 activations and accumulation: before the last rounding it is the float32 product of the
    bfloat16 weights to within float16's loss below its normal range."""
    if "half" not in candidates(torch.bfloat16):
        pytest.skip("this torch has no fbgemm float16-weight kernel")
    linear = random_linear(96, 64, torch.bfloat16)
    module = HalfWeightLinear(linear)
    x = torch.randn(5, 64).bfloat16().float()  # the activations a bfloat16 model passes
    from gptlab.torch_compat import half_weight_linear

    raw = half_weight_linear(x, module.packed, module.bias)
    expected = torch.nn.functional.linear(x, linear.weight.float(), linear.bias.float())
    assert torch.allclose(raw, expected, rtol=0, atol=1e-6)
    assert torch.equal(module(x.bfloat16()), raw.bfloat16())


def test_a_weight_outside_float16s_range_is_not_given_the_half_kernel():
    linear = random_linear(32, 32, torch.bfloat16)
    with torch.no_grad():
        linear.weight[3, 3] = 1e5
    assert type(decoding_linear(linear, "half")) is nn.Linear  # PyTorch's own linear carries it


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("half", [True, False])
def test_the_candidates_follow_what_the_cpu_and_torch_have(monkeypatch, bf16, half):
    monkeypatch.setattr(kernels, "onednn_bf16_supported", lambda: bf16)
    monkeypatch.setattr(kernels, "half_weight_available", lambda: half)
    assert candidates(torch.float32) == ["onednn"]
    assert candidates(torch.bfloat16) == (["onednn"] if bf16 else []) + (["half"] if half else []) or ["aten"]
    assert candidates(torch.float16) == ["aten"]
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert candidates(torch.float32) == ["aten"]


@pytest.mark.parametrize(
    "bf16, half, expected",
    [(True, True, "onednn"), (False, True, "half"), (True, False, "onednn"), (False, False, "aten")],
    ids=["amx-or-avx512-bf16", "avx2", "no-fbgemm", "neither"],
)
def test_the_rule_pins_the_kernel_each_kind_of_cpu_gets(monkeypatch, bf16, half, expected):
    monkeypatch.setattr(kernels, "onednn_bf16_supported", lambda: bf16)
    monkeypatch.setattr(kernels, "half_weight_available", lambda: half)
    assert kernel_for(torch.bfloat16) == expected and kernel_for(torch.float32) == "onednn"
