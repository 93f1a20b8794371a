"""The GPT-2 architecture, one module per textbook layer.

Each module computes exactly the textbook's formula; where PyTorch has a fused kernel for the same
function (layer_norm, gelu, scaled_dot_product_attention) we call it, and tests/test_model.py proves
the kernel equal to the explicit formula.

Shapes: B = batch, T = tokens, C = emb_dim, H = n_heads, D = head_dim = C / H, V = vocab_size.
"""

from __future__ import annotations

import math

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


class MultiHeadAttention(nn.Module):
    """Causal self-attention over H heads, with dropout on the attention weights.

    Queries, keys and values come from one fused projection (`qkv`, GPT-2's `c_attn`): one matmul
    instead of three, and the weight maps one-to-one onto GPT-2's checkpoints.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.drop_rate = cfg.drop_rate
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        dropout = self.drop_rate if self.training else 0.0
        # softmax(q·kᵀ/√D + causal mask) with dropout, then · v
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, H, T, D)
        return self.merge_heads(y)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + drop(attn(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """Token ids (B, T) → next-token logits (B, T, V)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
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

    def check_length(self, num_tokens: int) -> None:
        if num_tokens > self.cfg.context_length:
            raise ValueError(
                f"input has {num_tokens} tokens but the model's context_length is {self.cfg.context_length}; "
                f"pass at most {self.cfg.context_length} tokens (crop from the left)"
            )

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings, then dropout: (B, T) ids and (T,) or (B, T) positions → (B, T, C)."""
        return self.drop_emb(self.tok_emb(ids) + self.pos_emb(positions))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        self.check_length(T)
        x = self.embed(ids, torch.arange(T, device=ids.device))  # (B, T, C)
        for block in self.trf_blocks:
            x = block(x)
        return self.out_head(self.final_norm(x))  # (B, T, V)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device
