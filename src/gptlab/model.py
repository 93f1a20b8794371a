"""The GPT-2 architecture, one module per textbook layer.

Each module computes exactly the textbook's formula; where PyTorch has a fused kernel for the same
function (layer_norm, gelu, scaled_dot_product_attention) we call it, and tests/test_model.py proves
the kernel equal to the explicit formula.

Generation passes a KV cache (gptlab.inference.cache.KVCache, the one implementation of `Cache` below)
so that each step runs only the new tokens; the cache says, in a CacheStep, the new tokens' positions
and which cached keys each may see.

Shapes: B = batch, T = tokens, C = emb_dim, H = n_heads, D = head_dim = C / H, V = vocab_size,
L = tokens cached so far (the keys each new token attends to).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig


class LayerNorm(nn.Module):
    """Normalise each token's features to mean 0 and (biased) variance 1, then scale and shift."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as GPT-2 used."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: C → 4C → GELU → C."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.gelu = GELU()
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.gelu(self.fc(x)))


class Dropout(nn.Dropout):
    """nn.Dropout: in training, zero each value with probability p and scale the rest by 1/(1-p).

    On the CPU, PyTorch draws one Bernoulli sample per value, which took a sixth of the char model's
    training step once dropout was on. Here each value gets 16 random bits instead, four values per 64-bit
    draw, and is dropped if they fall among the lowest p·2¹⁶ of the 2¹⁶ patterns: forward and backward in
    less than half the time (benchmarks/cpu_train_step.py), for a rate rounded to a multiple of 2⁻¹⁶ (the
    scale uses the rounded rate, so the expected output is still x). GPUs keep PyTorch's kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0 < self.p < 1 and x.device.type == "cpu"):
            return super().forward(x)
        dropped = min(round(self.p * 2**16), 2**16 - 1)  # of every 2¹⁶ values, on average
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # 64 uniform bits each
        bits = bits.view(torch.int16)[: x.numel()].view(x.shape)  # 16 uniform bits per value: -2¹⁵ ... 2¹⁵-1
        keep = bits >= dropped - 2**15
        return x * keep * (2**16 / (2**16 - dropped))


# Below this many tokens, bfloat16 attention on the CPU runs in float32 (causal_attention).
FLOAT32_ATTENTION_BELOW = 256


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """softmax(q·kᵀ/√D + causal mask) with dropout, then · v: (B, H, T, D) each, in and out.

    On the CPU, PyTorch's fused kernel is slow in bfloat16 for short sequences (benchmarks/cpu_train_step.py;
    docs/benchmarks.md#kernel-choices). So short bfloat16 attention runs in float32 there; autocast would
    cast the inputs back down, so it is off for the call. GPUs keep their bfloat16 kernels.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.size(-2) < FLOAT32_ATTENTION_BELOW:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout, is_causal=True)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


class CacheStep(NamedTuple):
    """What a KV cache says about the T new tokens of a step."""

    positions: torch.Tensor  # (B, T): each new token's position
    mask: torch.Tensor | None  # (B, 1, T, L): which of the L keys read each new token sees; None: all of them
    where: object  # where the new keys and values go: the cache's own business, handed back to update()


class LayerCache(Protocol):
    def update(self, k: torch.Tensor, v: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's new keys and values (B, H, T, D); return every key and value it reads (B, H, L, D)."""


class Cache(Protocol):
    """What GPTModel asks of a KV cache."""

    layers: Sequence[LayerCache]

    def append(self, num_tokens: int) -> CacheStep:
        """Claim the slots of num_tokens new tokens per row."""


class MultiHeadAttention(nn.Module):
    """Causal self-attention over H heads, with dropout on the attention weights.

    Queries, keys and values come from one fused projection (`qkv`, GPT-2's `c_attn`): one matmul
    instead of three, and the weight maps one-to-one onto GPT-2's checkpoints.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.drop_rate = cfg.attention_drop_rate
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) → queries, keys, values, each (B, H, T, D)."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, D)
        return q, k, v

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) → output projection of (B, T, C)."""
        B, H, T, D = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * D))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, step: CacheStep | None = None) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        if cache is None:
            y = causal_attention(q, k, v, self.drop_rate if self.training else 0.0)  # (B, H, T, D)
        else:
            k, v = cache.update(k, v, step)  # every key and value the step reads: (B, H, L, D)
            # the cache may be wider than the model (float32 for bfloat16: inference.decoder.cache_dtype)
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=step.mask).to(q.dtype)  # (B, H, T, D)
        return self.merge_heads(y)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + drop(attn(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, step: CacheStep | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, step))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """Token ids (B, T) → next-token logits (B, T, V)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) everywhere, zero biases, unit LayerNorm scale, and the two
        projections that write into the residual stream scaled by 1/√(2·n_layers) so its variance
        does not grow with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("att.out_proj", "ff.proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.scale)
                nn.init.zeros_(module.shift)

    def init_sinusoidal_positions(self) -> None:
        """Restart the learned position table from the original Transformer's sin/cos code, scaled to
        GPT-2's std of 0.02. Offsets are then rotations shared by every position, so attention can find
        "the previous token" from the first steps; from GPT-2's random table, a small model first
        spends a long plateau learning that."""
        positions, dims = self.pos_emb.weight.shape
        angles = torch.arange(positions)[:, None] * 10000.0 ** (-torch.arange(0, dims, 2) / dims)  # (T, C/2)
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dims]  # (T, C): sin, cos interleaved
        with torch.no_grad():
            self.pos_emb.weight.copy_(table * 0.02 * math.sqrt(2))  # each of sin and cos has RMS 1/√2

    def check_length(self, num_tokens: int) -> None:
        if num_tokens > self.cfg.context_length:
            raise ValueError(
                f"input has {num_tokens} tokens but the model's context_length is {self.cfg.context_length}; "
                f"pass at most {self.cfg.context_length} tokens (crop from the left)"
            )

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings, then dropout: (B, T) ids and (T,) or (B, T) positions → (B, T, C)."""
        return self.drop_emb(self.tok_emb(ids) + self.pos_emb(positions))

    def hidden_states(self, ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(B, T) ids → the final-normed features (B, T, C) that the output head turns into logits.

        With a cache, `ids` are the tokens that follow those already cached: their positions carry on
        from there, they attend to the cached keys, and their own keys and values are added.
        """
        B, T = ids.shape
        if cache is None:
            self.check_length(T)
            x = self.embed(ids, torch.arange(T, device=ids.device))  # (B, T, C)
            for block in self.trf_blocks:
                x = block(x)
        else:
            step = cache.append(T)
            x = self.embed(ids, step.positions)
            for block, layer in zip(self.trf_blocks, cache.layers):
                x = block(x, layer, step)
        return self.final_norm(x)

    def forward(self, ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return self.out_head(self.hidden_states(ids, cache))  # (B, T, V)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device
