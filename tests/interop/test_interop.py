"""Weights loaded from a Hugging Face GPT-2 give transformers' logits and greedy tokens, and go back again.

The reference is transformers' own GPT2LMHeadModel with its eager (explicit, non-SDPA) attention,
randomly initialised here: no download.
"""

import pytest
import torch

from gptlab.hf_format import config_from_hf, state_dict_from_hf, state_dict_to_hf
from gptlab.inference.generate import generate, generate_uncached
from gptlab.model import GPTModel

transformers = pytest.importorskip("transformers")

# Head sizes 32 and 16 (not GPT-2's 64), an untied head, and the full GPT-2 vocabulary.
HF_SHAPES = {
    "96d-3heads-tied": dict(vocab_size=1000, n_positions=64, n_embd=96, n_head=3, n_layer=2),
    "80d-5heads-untied": dict(
        vocab_size=50257, n_positions=64, n_embd=80, n_head=5, n_layer=3, tie_word_embeddings=False
    ),
}
PROMPT_LENGTH = 8
NEW_TOKENS = 30


def random_hf_model(shape: dict):
    """An HF GPT-2 whose every parameter (LayerNorm scales and biases included) is random, so a
    misplaced bias or scale cannot hide behind HF's ones-and-zeros initialisation."""
    config = transformers.GPT2Config(
        **shape,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        bos_token_id=None,
        eos_token_id=None,  # no early stop: both sides must produce all NEW_TOKENS
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=HF_SHAPES.values(), ids=HF_SHAPES.keys())
def hf_model(request):
    torch.manual_seed(0)
    return random_hf_model(request.param)


def gptlab_from_hf(hf_state: dict, hf_model):
    cfg = config_from_hf(hf_model.config.to_dict())
    model = GPTModel(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf_state, cfg), strict=True)
    return model


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(ids).logits


def test_config_from_hf_reads_the_shape(hf_model):
    cfg = config_from_hf(hf_model.config.to_dict())
    hf = hf_model.config
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (
        hf.vocab_size,
        hf.n_positions,
        hf.n_embd,
        hf.n_head,
        hf.n_layer,
    )
    assert cfg.qkv_bias is True
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert cfg.drop_rate == hf.resid_pdrop
    assert cfg.attention_drop_rate == hf.attn_pdrop


def test_logits_match_transformers(hf_model):
    model = gptlab_from_hf(hf_model.state_dict(), hf_model)
    assert (model.out_head.weight is model.tok_emb.weight) == model.cfg.tie_embeddings
    ids = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.context_length))
    with torch.no_grad():
        difference = (model(ids) - hf_logits(hf_model, ids)).abs().max().item()
    assert difference <= 1e-4


def test_greedy_tokens_match_transformers(hf_model):
    model = gptlab_from_hf(hf_model.state_dict(), hf_model)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, PROMPT_LENGTH))
    expected = hf_model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    ours = generate(model, prompt, NEW_TOKENS)  # the KV-cached path, and the textbook loop, both equal HF's
    assert torch.equal(generate_uncached(model, prompt, NEW_TOKENS), ours)
    assert ours.shape == (1, PROMPT_LENGTH + NEW_TOKENS)
    assert ours.tolist() == expected.tolist()
    assert len(set(ours[0, PROMPT_LENGTH:].tolist())) > 1  # not a degenerate one-token loop


def test_keys_without_prefix_and_old_mask_buffers_load(hf_model):
    n_layers, context = hf_model.config.n_layer, hf_model.config.n_positions
    bare = {key.removeprefix("transformer."): value for key, value in hf_model.state_dict().items()}
    for layer in range(n_layers):  # what older transformers versions saved alongside the weights
        bare[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, context, context))
        bare[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    from_bare = gptlab_from_hf(bare, hf_model)
    from_prefixed = gptlab_from_hf(hf_model.state_dict(), hf_model)
    for name, tensor in from_prefixed.state_dict().items():
        assert torch.equal(from_bare.state_dict()[name], tensor), name


def test_state_dict_to_hf_round_trip(hf_model):
    cfg = config_from_hf(hf_model.config.to_dict())
    model = GPTModel(cfg).eval()  # gptlab's own random weights, not the HF model's
    fresh_hf = transformers.GPT2LMHeadModel(hf_model.config).eval()
    fresh_hf.load_state_dict(state_dict_to_hf(model.state_dict(), cfg), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(fresh_hf, ids), model(ids), atol=1e-4, rtol=0)
    reloaded = gptlab_from_hf(fresh_hf.state_dict(), fresh_hf)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_missing_weight_is_named(hf_model):
    cfg = config_from_hf(hf_model.config.to_dict())
    incomplete = {key: value for key, value in hf_model.state_dict().items() if "h.1.mlp.c_fc.weight" not in key}
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight"):
        state_dict_from_hf(incomplete, cfg)
