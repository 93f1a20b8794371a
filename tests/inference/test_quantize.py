"""Quantized weights: the int8 and int4 formats against their definitions, each quantized Linear against
the explicit formula, quantize_model's copy and its bad input, and the quality of a small trained model
(held-out perplexity, greedy tokens) next to its float32 original, through evaluation and the KV-cached
decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.data import default_corpus_text, split_text
from gptlab.inference.decoder import Decoder, DecoderSettings
from gptlab.inference.generate import generate_ids, generate_uncached
from gptlab.inference.quantize import (
    INT4_GROUP_SIZE,
    DynamicInt8Linear,
    Int4Linear,
    QuantizedLinear,
    is_quantized,
    quantize_groups,
    quantize_model,
    quantize_rows,
)
from gptlab.inference.sampling import GenerationOptions
from gptlab.model import GPTModel
from gptlab.tokenizer import CharTokenizer
from gptlab.training.evaluation import evaluate

# in_features, out_features, bias; out_features not a multiple of 16 makes Int4Linear pad its rows
LINEAR_SHAPES = [(64, 37, True), (96, 130, False), (768, 2304, True)]
# A quantized model is decoded as it is: the decoder's float32 weight copy would rebuild a float GPTModel.
AS_IS = DecoderSettings(prepare_weights=False)
GREEDY = GenerationOptions(max_new_tokens=200, temperature=0)
SAMPLED = GenerationOptions(max_new_tokens=200, temperature=1.0, seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread on this shared machine, and the training below is then
    the same from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpt2_style_linear(in_features: int, out_features: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.02)
    return linear


def int4_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """(q - 8)·scale + offset, group by group, in float64: the weight Int4Linear multiplies by (out, in)."""
    out_features, in_features = weight.shape
    q, scales, offsets = quantize_groups(weight, INT4_GROUP_SIZE)
    groups = q.double().reshape(out_features, -1, INT4_GROUP_SIZE)  # (out, G, g)
    return ((groups - 8) * scales.double()[..., None] + offsets.double()[..., None]).reshape(out_features, in_features)


# --- the formats ---------------------------------------------------------------------------------------


def test_int8_rows_are_the_symmetric_absmax_code():
    weight = gpt2_style_linear(64, 37, False).weight.detach().clone()
    weight[3] = 0.0  # an all-zero row must not divide by zero
    weight[5, 7] = 1.5  # an outlier sets its row's scale alone
    q, scales = quantize_rows(weight)
    live = torch.ones(37, dtype=torch.bool)
    live[3] = False
    assert torch.equal(scales[live], weight[live].abs().amax(dim=1) / 127)
    assert torch.equal(q.abs().amax(dim=1)[live], torch.full((36,), 127, dtype=torch.int8))
    assert not q[3].any()
    assert torch.all((weight - q.float() * scales[:, None]).abs() <= scales[:, None] / 2 * (1 + 1e-6))

    q16, scales16 = quantize_rows(weight, torch.bfloat16)  # scales rounded first, so q·scale is the weight used
    assert scales16.dtype == torch.bfloat16
    assert torch.all(
        (weight - q16.float() * scales16.float()[:, None]).abs() <= scales16.float()[:, None] / 2 * (1 + 1e-6)
    )


def test_int4_groups_cover_each_group_range():
    weight = gpt2_style_linear(128, 48, False).weight.detach()
    for scale_dtype, slack in ((torch.float32, 0.0), (torch.bfloat16, 2**-8)):
        q, scales, offsets = quantize_groups(weight, INT4_GROUP_SIZE, scale_dtype)
        assert q.dtype == torch.int32 and q.min() >= 0 and q.max() <= 15
        groups = weight.reshape(48, -1, INT4_GROUP_SIZE)  # (out, G, g)
        codes = q.reshape(48, -1, INT4_GROUP_SIZE).double()
        scale, offset = scales.double()[..., None], offsets.double()[..., None]
        error = (groups.double() - ((codes - 8) * scale + offset)).abs()
        # half a step, plus (bfloat16) the rounding of the offset and of the scale times the largest code distance
        assert torch.all(error <= scale / 2 + slack * (offset.abs() + 8 * scale) + 1e-9)
        assert torch.equal(
            codes.amin(dim=-1), torch.zeros(48, 4, dtype=torch.float64)
        )  # each group's minimum is code 0


# --- each quantized Linear against the explicit formula ------------------------------------------------


@pytest.mark.parametrize("in_features, out_features, bias", LINEAR_SHAPES)
@pytest.mark.parametrize("rows, shift", [(1, 0.0), (7, 3.0), (5, -2.0)])
def test_dynamic_int8_linear_is_dequantized_weight_times_input(in_features, out_features, bias, rows, shift):
    """y = x·(q·s)ᵀ + b, except that the kernel also rounds x to 7-bit steps of (max(x, 0) - min(x, 0)) / 127
    for the whole call: each y[n, o] is then within step/2 · Σ_i |q·s|[o, i] of the formula."""
    linear = gpt2_style_linear(in_features, out_features, bias)
    module = DynamicInt8Linear(linear)
    q, scales, packed_bias = module.unpacked()
    expected_q, expected_scales = quantize_rows(linear.weight)
    assert torch.equal(q, expected_q) and torch.equal(scales, expected_scales)
    assert packed_bias is None if not bias else torch.equal(packed_bias, linear.bias.float())

    x = torch.randn(rows, in_features) + shift
    weight = q.double() * scales.double()[:, None]  # (out, in)
    expected = x.double() @ weight.T + (linear.bias.double() if bias else 0.0)
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)).double() / 127
    error = (module(x).double() - expected).abs()
    assert torch.all(error <= step / 2 * weight.abs().sum(dim=1) + 1e-6)  # measured: at most 0.32 of the bound


@pytest.mark.parametrize("in_features, out_features, bias", LINEAR_SHAPES)
@pytest.mark.parametrize("rows, shift", [(1, 0.0), (7, 3.0), (5, -2.0)])
def test_int4_linear_is_dequantized_weight_times_input(in_features, out_features, bias, rows, shift):
    """y = x·((q - 8)·s + z)ᵀ + b with x in bfloat16, as the kernel takes it; its bfloat16 arithmetic may
    be off by one bfloat16 rounding (2⁻⁸) of Σ_i |x_i·w_i| + |b|."""
    linear = gpt2_style_linear(in_features, out_features, bias)
    module = Int4Linear(linear, INT4_GROUP_SIZE)
    x = torch.randn(rows, in_features) + shift
    padded = F.pad(linear.weight.detach(), (0, 0, 0, -out_features % 16))  # the kernel's zero rows
    weight = int4_dequantized(padded)[:out_features]  # (out, in)
    x16 = x.bfloat16().double()
    bias_term = linear.bias.double() if bias else torch.zeros(out_features, dtype=torch.float64)
    expected = x16 @ weight.T + bias_term
    error = (module(x).double() - expected).abs()
    assert torch.all(error <= 2**-8 * (x16.abs() @ weight.abs().T + bias_term.abs()))  # measured: at most 0.31 of it


@pytest.mark.parametrize(
    "make", [DynamicInt8Linear, lambda linear: Int4Linear(linear, INT4_GROUP_SIZE)], ids=["int8", "int4"]
)
def test_quantized_linear_keeps_leading_dimensions_and_dtype(make):
    linear = gpt2_style_linear(64, 37, True)
    module = make(linear)
    x = torch.randn(2, 3, 64)
    flat = module(x.reshape(6, 64))
    assert torch.equal(module(x), flat.reshape(2, 3, 37))
    assert module(x.bfloat16()).dtype == torch.bfloat16


# --- quantize_model ------------------------------------------------------------------------------------


def tiny_config(**changes) -> GPTConfig:
    return GPTConfig(vocab_size=97, context_length=32, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0).replace(
        **changes
    )


@pytest.mark.parametrize("mode, kind", [("int8", DynamicInt8Linear), ("int4", Int4Linear)])
@pytest.mark.parametrize("tied", [False, True])
def test_quantize_model_replaces_every_linear_and_leaves_the_original(mode, kind, tied):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(tie_embeddings=tied, qkv_bias=True)).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        before = model(ids)
    linear_names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert len(linear_names) == 4 * 2 + 1  # qkv, out_proj, fc, proj per block, and the head

    quantized = quantize_model(model, mode)
    replaced = {name: module for name, module in quantized.named_modules() if isinstance(module, QuantizedLinear)}
    assert set(replaced) == linear_names and all(isinstance(module, kind) for module in replaced.values())
    assert not any(isinstance(module, nn.Linear) for module in quantized.modules())
    assert is_quantized(quantized) and not is_quantized(model)
    assert not quantized.training
    # embeddings and LayerNorms stay float and are shared, not copied
    assert quantized.tok_emb.weight is model.tok_emb.weight and quantized.pos_emb.weight is model.pos_emb.weight
    assert quantized.trf_blocks[1].norm2.scale is model.trf_blocks[1].norm2.scale
    # the original is untouched: its layers, its tied head, its outputs
    assert all(isinstance(model.get_submodule(name), nn.Linear) for name in linear_names)
    assert (model.out_head.weight is model.tok_emb.weight) == tied
    with torch.no_grad():
        assert torch.equal(model(ids), before)
        # each layer holds its own weight: relative RMS error against its float layer, measured at most
        # 0.017 (int8) and 0.087 (int4); a layer built from another weight would be off by about 1.4
        for name in linear_names:
            linear = model.get_submodule(name)
            x = torch.randn(5, linear.in_features)
            error = quantized.get_submodule(name)(x) - linear(x)
            assert error.pow(2).mean().sqrt() < 0.15 * linear(x).pow(2).mean().sqrt()


def test_quantize_model_rejects_an_unknown_mode():
    model = GPTModel(tiny_config())
    for mode in ("int3", "INT8", "", "fp8"):
        with pytest.raises(ValueError, match=r"quantize must be one of int8, int4, got"):
            quantize_model(model, mode)


def test_int4_needs_inputs_in_whole_groups():
    model = GPTModel(tiny_config(emb_dim=48, n_heads=2))
    with pytest.raises(ValueError, match=r"groups of 32 inputs, but trf_blocks\.0\.att\.qkv has 48 inputs; use int8"):
        quantize_model(model, "int4")
    assert is_quantized(quantize_model(model, "int8"))


def test_quantize_model_needs_the_cpu():
    model = GPTModel(tiny_config()).to("meta")  # a device other than the CPU that every machine has
    with pytest.raises(ValueError, match=r"run on the CPU, but the model is on meta; load it with --device cpu"):
        quantize_model(model, "int8")


# --- with the KV-cached decoder ------------------------------------------------------------------------


def test_int4_cached_decoding_equals_the_uncached_loop_and_batches_equal_single_prompts():
    """int4 rows never interact (activations stay bfloat16), so the decoder must reproduce the textbook
    loop on the same quantized model exactly, past the context too, and a padded batch each prompt alone."""
    torch.manual_seed(0)
    cfg = tiny_config()
    quantized = quantize_model(GPTModel(cfg).eval(), "int4")
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11)]
    alone = []
    for prompt in prompts:
        expected = generate_uncached(quantized, torch.tensor([prompt]), 60)[0, len(prompt) :].tolist()
        settings = DecoderSettings(prepare_weights=False, keep=cfg.context_length)
        alone += generate_ids(quantized, [prompt], GREEDY.replace(max_new_tokens=60), settings=settings)
        assert alone[-1] == expected
    assert generate_ids(quantized, prompts, GREEDY.replace(max_new_tokens=20), settings=AS_IS) == [
        row[:20] for row in alone
    ]


# --- quality on a small trained model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A character model (2 layers, 64 features, context 32) trained for 150 AdamW steps (about 4 s) on the
    first 54,000 characters of the embedded corpus, scored on the next 6,000; and a random model."""
    train_text, val_text = split_text(default_corpus_text()[:60_000])
    tokenizer = CharTokenizer.from_text(train_text + val_text)
    train_ids = torch.tensor(tokenizer.encode(train_text))
    cfg = tiny_config(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    model.init_sinusoidal_positions()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(150):
        starts = torch.randint(0, len(train_ids) - cfg.context_length - 1, (16,))
        rows = torch.stack(
            [train_ids[start : start + cfg.context_length + 1] for start in starts.tolist()]
        )  # (16, T + 1)
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    val_ids = np.array(tokenizer.encode(val_text))
    prompt = tokenizer.encode(val_text[:20])
    return model.eval(), GPTModel(cfg).eval(), val_ids, len(val_text.encode()), prompt


def perplexity(model: GPTModel, val_ids: np.ndarray, n_bytes: int) -> float:
    return evaluate(model, val_ids, n_bytes, batch_size=16).perplexity


def greedy_agreement(model: GPTModel, reference: GPTModel, prompt: list[int]) -> float:
    """Along a 200-token text sampled (seeded) from the reference, the share of positions at which the
    model's greedy choice, the argmax of its KV-cached decoder's logits, is the reference's.

    Both read the same text (teacher forcing): free-running greedy texts that differ once differ
    everywhere after, so one near-tie would count as up to 200 mismatches; and a sampled text, unlike
    this small model's greedy loop (" the the the"), visits varied contexts.
    """
    text = generate_ids(reference, [prompt], SAMPLED, settings=AS_IS)[0]
    decoders = [Decoder(model, 1, AS_IS), Decoder(reference, 1, AS_IS)]
    logits = [decoder.prefill([prompt]) for decoder in decoders]  # each (1, V)
    agreed = 0
    for token in text:  # past the context both decoders slide, as when generating
        agreed += int(logits[0].argmax() == logits[1].argmax())
        logits = [decoder.step(torch.tensor([token])) for decoder in decoders]
    return agreed / len(text)


def test_int8_keeps_perplexity_within_1_percent_and_the_greedy_choices(trained):
    model, _, val_ids, n_bytes, prompt = trained
    quantized = quantize_model(model, "int8")
    float_ppl, int8_ppl = perplexity(model, val_ids, n_bytes), perplexity(quantized, val_ids, n_bytes)
    # measured: float32 15.194, int8 15.201 (+0.04%); greedy choices 199 of 200 equal (free-running greedy
    # texts: 200 of 200)
    assert float_ppl < 20
    assert abs(int8_ppl / float_ppl - 1) < 0.01
    assert greedy_agreement(quantized, model, prompt) >= 0.95


def test_int4_perplexity_close_to_float_and_far_from_random(trained):
    model, random_model, val_ids, n_bytes, prompt = trained
    quantized = quantize_model(model, "int4")
    float_ppl, int4_ppl = perplexity(model, val_ids, n_bytes), perplexity(quantized, val_ids, n_bytes)
    # measured: float32 15.194, int4 15.221 (+0.18%), the random model 97.8; greedy choices 193 of 200
    # equal (free-running greedy texts: 2 of 200, one early extra token shifts the rest)
    assert abs(int4_ppl / float_ppl - 1) < 0.03
    assert int4_ppl < 0.5 * perplexity(random_model, val_ids, n_bytes)
    assert greedy_agreement(quantized, model, prompt) >= 0.85


def test_generate_and_eval_take_quantize_on_the_cpu(tmp_path, capsys):
    tokenizer = CharTokenizer("abcdefgh ")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, emb_dim=64, n_heads=2, n_layers=1))
    save_model(tmp_path / "model", model, tokenizer)
    argv = [
        "generate",
        "--checkpoint",
        str(tmp_path / "model"),
        "--prompt",
        "abc",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--quantize", "int8"]) == 0
    assert capsys.readouterr().out == plain  # a random model's clear greedy choices survive int8 weights
    (tmp_path / "text.txt").write_text("abc defg hab " * 20)
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "model"),
                "--data",
                str(tmp_path / "text.txt"),
                "--device",
                "cpu",
                "--quantize",
                "int8",
            ]
        )
        == 0
    )
    assert "bits/byte" in capsys.readouterr().out
