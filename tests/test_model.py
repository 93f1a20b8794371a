"""The model's layers against the textbook formulas, written out explicitly here."""

import math

import pytest
import torch

from gptlab.config import GPTConfig, get_config
from gptlab.model import (
    FLOAT32_ATTENTION_BELOW,
    GELU,
    Dropout,
    FeedForward,
    GPTModel,
    LayerNorm,
    MultiHeadAttention,
    TransformerBlock,
    causal_attention,
)

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def explicit_gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def explicit_layer_norm(x, scale, shift, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased: divide by C, not C - 1
    return (x - mean) / torch.sqrt(var + eps) * scale + shift


def explicit_linear(x, linear):
    out = x @ linear.weight.T
    return out if linear.bias is None else out + linear.bias


def explicit_attention(att, x):
    """Causal multi-head attention the long way: one head at a time, explicit mask and softmax."""
    B, T, C = x.shape
    H, D = att.n_heads, C // att.n_heads
    q, k, v = explicit_linear(x, att.qkv).split(C, dim=-1)  # 3 × (B, T, C), heads side by side
    heads = []
    for h in range(H):
        columns = slice(h * D, (h + 1) * D)
        scores = q[..., columns] @ k[..., columns].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        heads.append(weights @ v[..., columns])  # (B, T, D)
    return explicit_linear(torch.cat(heads, dim=-1), att.out_proj)  # (B, T, C)


def explicit_feed_forward(ff, x):
    return explicit_linear(explicit_gelu(explicit_linear(x, ff.fc)), ff.proj)


def randomise_(module):
    """Non-trivial values everywhere, so zero biases or unit scales cannot hide a mistake."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return module


def test_layer_norm_equals_formula():
    norm = randomise_(LayerNorm(48))
    x = torch.randn(3, 7, 48) * 4 + 2
    torch.testing.assert_close(norm(x), explicit_layer_norm(x, norm.scale, norm.shift), atol=1e-5, rtol=0)


def test_gelu_equals_tanh_formula():
    x = torch.cat([torch.linspace(-6, 6, 1001), torch.randn(1000) * 2])
    torch.testing.assert_close(GELU()(x), explicit_gelu(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_attention_equals_explicit_formula(qkv_bias, train):
    att = randomise_(MultiHeadAttention(TINY.replace(qkv_bias=qkv_bias))).train(train)
    assert (att.qkv.bias is not None) == qkv_bias
    x = torch.randn(2, 11, TINY.emb_dim)
    torch.testing.assert_close(att(x), explicit_attention(att, x), atol=1e-5, rtol=0)


def test_attention_is_causal():
    att = randomise_(MultiHeadAttention(TINY)).eval()
    x = torch.randn(1, 9, TINY.emb_dim)
    changed_future = x.clone()
    changed_future[:, 5:] = torch.randn(1, 4, TINY.emb_dim)
    torch.testing.assert_close(att(x)[:, :5], att(changed_future)[:, :5])


def test_attention_dropout_only_in_train_mode():
    att = randomise_(MultiHeadAttention(TINY.replace(drop_rate=0.5)))
    x = torch.randn(2, 11, TINY.emb_dim)
    att.train()
    assert not torch.equal(att(x), att(x))
    att.eval()
    assert torch.equal(att(x), att(x))
    torch.testing.assert_close(att(x), explicit_attention(att, x), atol=1e-5, rtol=0)


def test_attention_dropout_can_be_switched_off_apart_from_the_shortcut_dropout():
    block = randomise_(TransformerBlock(TINY.replace(drop_rate=0.5, attn_drop_rate=0.0))).train()
    x = torch.randn(2, 11, TINY.emb_dim)
    assert block.att.drop_rate == 0.0 and block.drop_shortcut.p == 0.5
    assert torch.equal(block.att(x), block.att(x))
    assert not torch.equal(block(x), block(x))
    assert TINY.replace(drop_rate=0.2).attention_drop_rate == 0.2  # unset: the textbook's single rate


def test_bfloat16_attention_on_the_cpu_is_computed_in_float32():
    """Under bf16 autocast the fused kernel would run in bfloat16 (and slowly on the CPU); causal_attention
    casts up, so its output and gradients are float64's, rounded once to bfloat16 (relative error 2^-8)."""
    B, H, T, D = 2, 3, 40, 16
    q, k, v = (torch.randn(B, H, T, D).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_attention(q, k, v, dropout=0.0)
    assert y.dtype == torch.bfloat16
    grad = torch.randn(B, H, T, D)
    y.backward(grad.bfloat16())

    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores = (wide[0] @ wide[1].transpose(-2, -1) / math.sqrt(D)).masked_fill(future, float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ wide[2]  # (B, H, T, D)
    expected.backward(grad.bfloat16().double())
    torch.testing.assert_close(y.double(), expected, rtol=2**-8, atol=1e-6)
    for narrow, exact in zip((q, k, v), wide):
        assert narrow.grad.dtype == torch.bfloat16
        torch.testing.assert_close(narrow.grad.double(), exact.grad, rtol=2**-8, atol=1e-5)


def test_long_bfloat16_attention_keeps_the_bfloat16_kernel():
    q, k, v = (torch.randn(1, 2, FLOAT32_ATTENTION_BELOW, 16).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_attention(q, k, v, dropout=0.0)
    assert torch.equal(y, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_zeros_a_share_p_of_the_values_and_scales_the_rest(p):
    """Its own CPU mask: 16 random bits per value, four per 64-bit draw. Every one of the four positions
    must drop at rate p (a draw's top bits are not always random), and the gradient is the same mask."""
    torch.manual_seed(0)
    x = torch.rand(1000, 1000, dtype=torch.float64) + 1.0  # never 0, so the zeros are the dropped values
    x.requires_grad_()
    y = Dropout(p).train()(x)
    kept = y != 0
    dropped = round(p * 2**16) / 2**16  # the rate, rounded to 16 bits
    torch.testing.assert_close(y[kept], x[kept] / (1 - dropped), rtol=1e-15, atol=0)
    tolerance = 5 * math.sqrt(p * (1 - p) / (x.numel() / 4))  # five standard deviations of one position's share
    for lane in range(4):
        assert abs(1 - kept.flatten()[lane::4].double().mean().item() - p) < tolerance
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.double() / (1 - dropped), rtol=1e-15, atol=0)


def test_dropout_is_the_identity_in_eval_mode_or_at_rate_0_and_reproducible_under_a_seed():
    x = torch.randn(3, 5, 7).bfloat16()
    assert torch.equal(Dropout(0.3).eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    torch.manual_seed(1)
    first = Dropout(0.3).train()(x)
    torch.manual_seed(1)
    assert torch.equal(Dropout(0.3).train()(x), first) and first.dtype == torch.bfloat16


def test_feed_forward_is_fc_gelu_proj():
    ff = randomise_(FeedForward(TINY))
    assert (ff.fc.in_features, ff.fc.out_features) == (TINY.emb_dim, 4 * TINY.emb_dim)
    assert (ff.proj.in_features, ff.proj.out_features) == (4 * TINY.emb_dim, TINY.emb_dim)
    x = torch.randn(2, 5, TINY.emb_dim)
    torch.testing.assert_close(ff(x), explicit_feed_forward(ff, x), atol=1e-5, rtol=0)


def test_transformer_block_is_pre_layer_norm():
    block = randomise_(TransformerBlock(TINY.replace(drop_rate=0.3))).eval()
    x = torch.randn(2, 8, TINY.emb_dim)
    hidden = x + explicit_attention(block.att, explicit_layer_norm(x, block.norm1.scale, block.norm1.shift))
    expected = hidden + explicit_feed_forward(
        block.ff, explicit_layer_norm(hidden, block.norm2.scale, block.norm2.shift)
    )
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)


def test_gpt_model_output_is_embeddings_through_blocks_norm_and_head():
    model = GPTModel(TINY).eval()
    ids = torch.randint(0, TINY.vocab_size, (3, TINY.context_length))
    logits = model(ids)
    assert logits.shape == (3, TINY.context_length, TINY.vocab_size)
    x = model.tok_emb.weight[ids] + model.pos_emb.weight[: TINY.context_length]
    for block in model.trf_blocks:
        x = block(x)
    expected = explicit_layer_norm(x, model.final_norm.scale, model.final_norm.shift) @ model.out_head.weight.T
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_gpt_model_rejects_input_longer_than_context():
    model = GPTModel(TINY)
    too_long = torch.zeros(1, TINY.context_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"17 tokens.*context_length is 16"):
        model(too_long)


@pytest.mark.parametrize("tie", [False, True])
def test_weight_tying_shares_the_tensor(tie):
    model = GPTModel(TINY.replace(tie_embeddings=tie))
    assert (model.out_head.weight is model.tok_emb.weight) == tie
    head_params = TINY.vocab_size * TINY.emb_dim
    untied_total = sum(p.numel() for p in GPTModel(TINY).parameters())
    assert sum(p.numel() for p in model.parameters()) == untied_total - (head_params if tie else 0)


def test_initialisation_statistics():
    cfg = get_config("gpt2-mini", vocab_size=1000)  # gpt2-mini's blocks; a small vocabulary keeps it fast
    model = GPTModel(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            expected = residual_std if name.endswith(("att.out_proj", "ff.proj")) else 0.02
            assert module.weight.std().item() == pytest.approx(expected, rel=0.1), name
            assert abs(module.weight.mean().item()) < expected / 10, name
            if module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0, name
        elif isinstance(module, torch.nn.Embedding):
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.1), name
        elif isinstance(module, LayerNorm):
            assert torch.equal(module.scale, torch.ones_like(module.scale)), name
            assert torch.count_nonzero(module.shift) == 0, name
    assert model.trf_blocks[0].att.out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(12), rel=0.1)


def test_sinusoidal_positions_are_the_transformer_code_at_gpt2_scale():
    model = GPTModel(TINY.replace(context_length=40))
    model.init_sinusoidal_positions()
    table = model.pos_emb.weight.detach()
    amplitude = 0.02 * math.sqrt(2)
    for position, pair in [(0, 0), (7, 3), (39, 15)]:
        angle = position / 10000 ** (2 * pair / TINY.emb_dim)
        assert table[position, 2 * pair].item() == pytest.approx(amplitude * math.sin(angle), abs=1e-7)
        assert table[position, 2 * pair + 1].item() == pytest.approx(amplitude * math.cos(angle), abs=1e-7)
    assert table.pow(2).mean().sqrt().item() == pytest.approx(0.02, rel=1e-5)  # GPT-2's init std
    # What makes it useful: the dot product of two positions depends only on how far apart they are.
    gram = table @ table.T
    for offset in (1, 5, 20):
        along = gram.diagonal(offset)
        torch.testing.assert_close(along, along[:1].expand_as(along), atol=1e-9, rtol=1e-5)
