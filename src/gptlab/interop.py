"""Hugging Face GPT-2 layout <-> gptlab: the one place that knows how the two name and store weights.

HF's GPT-2 keeps its projections as Conv1D modules whose weights are stored [in, out] (transposed
relative to nn.Linear), fuses q|k|v into `c_attn`, and ties `lm_head` to `wte`.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .config import GPTConfig

# gptlab name -> HF name, per block; True where HF stores the weight transposed (Conv1D).
BLOCK_KEYS: dict[str, tuple[str, bool]] = {
    "norm1.scale": ("ln_1.weight", False),
    "norm1.shift": ("ln_1.bias", False),
    "att.qkv.weight": ("attn.c_attn.weight", True),
    "att.qkv.bias": ("attn.c_attn.bias", False),
    "att.out_proj.weight": ("attn.c_proj.weight", True),
    "att.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.scale": ("ln_2.weight", False),
    "norm2.shift": ("ln_2.bias", False),
    "ff.fc.weight": ("mlp.c_fc.weight", True),
    "ff.fc.bias": ("mlp.c_fc.bias", False),
    "ff.proj.weight": ("mlp.c_proj.weight", True),
    "ff.proj.bias": ("mlp.c_proj.bias", False),
}
TOP_KEYS: dict[str, tuple[str, bool]] = {
    "tok_emb.weight": ("wte.weight", False),
    "pos_emb.weight": ("wpe.weight", False),
    "final_norm.scale": ("ln_f.weight", False),
    "final_norm.shift": ("ln_f.bias", False),
}


def key_map(cfg: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Every gptlab parameter name (except the head) -> (HF name without 'transformer.', transposed?)."""
    mapping = dict(TOP_KEYS)
    for layer in range(cfg.n_layers):
        for ours, (theirs, transposed) in BLOCK_KEYS.items():
            if ours == "att.qkv.bias" and not cfg.qkv_bias:
                continue
            mapping[f"trf_blocks.{layer}.{ours}"] = (f"h.{layer}.{theirs}", transposed)
    return mapping


def config_from_hf(hf: Mapping) -> GPTConfig:
    """A GPTConfig from the fields of a transformers GPT2Config (its config.json)."""
    context = hf.get("n_positions", hf.get("n_ctx", 1024))
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        context_length=context,
        emb_dim=hf.get("n_embd", 768),
        n_heads=hf.get("n_head", 12),
        n_layers=hf.get("n_layer", 12),
        drop_rate=hf.get("resid_pdrop", 0.1),
        qkv_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def state_dict_from_hf(hf_state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename and transpose an HF GPT-2 state dict into gptlab's names.

    Accepts keys with or without the 'transformer.' prefix, with or without lm_head.weight (tied),
    and ignores the old attn.bias / attn.masked_bias mask buffers.
    """
    hf = {key.removeprefix("transformer."): value for key, value in hf_state.items()}
    state: dict[str, torch.Tensor] = {}
    for ours, (theirs, transposed) in key_map(cfg).items():
        if theirs not in hf:
            raise ValueError(f"checkpoint is missing weight {theirs!r} (for {ours}); is it a GPT-2 checkpoint of this shape?")
        tensor = hf[theirs]
        state[ours] = tensor.t() if transposed else tensor
    if cfg.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    elif "lm_head.weight" in hf:
        state["out_head.weight"] = hf["lm_head.weight"]
    else:
        raise ValueError("checkpoint has no lm_head.weight but its config says the head is not tied")
    return state


def state_dict_to_hf(state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gptlab names -> HF GPT2LMHeadModel names (with the 'transformer.' prefix and lm_head.weight)."""
    hf: dict[str, torch.Tensor] = {}
    for ours, (theirs, transposed) in key_map(cfg).items():
        tensor = state[ours]
        hf[f"transformer.{theirs}"] = (tensor.t() if transposed else tensor).contiguous()
    hf["lm_head.weight"] = state["tok_emb.weight" if cfg.tie_embeddings else "out_head.weight"]
    return hf
