"""Model configuration: one dataclass, named presets, JSON round-trip, validation a person can act on."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT model. Field names follow the textbook (Raschka, *Build a LLM from Scratch*)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1  # dropout on the embeddings and on every shortcut branch
    # Dropout on the attention weights; None means drop_rate, as in the textbook. 0 keeps CPU attention
    # on its fused kernel, which has no dropout and is about twice as fast as the fallback.
    attn_drop_rate: float | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False  # share the output head's weight with the token embedding (GPT-2 does)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            hint = " (GPT-2 124M uses emb_dim 768 with 12 heads)" if self.n_heads == 12 else ""
            raise UserError(
                f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}: "
                f"each head gets emb_dim / n_heads dimensions, so choose a multiple of {self.n_heads}{hint}"
            )
        rates = {"drop_rate": self.drop_rate, "attn_drop_rate": self.attention_drop_rate}
        for name, value in rates.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def attention_drop_rate(self) -> float:
        return self.drop_rate if self.attn_drop_rate is None else self.attn_drop_rate

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"unknown GPTConfig field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "GPTConfig":
        return cls.from_dict(json.loads(text))


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),
    # Small shapes for CPU experiments; the training command swaps in its tokenizer's vocab_size.
    "gpt2-mini": GPTConfig(context_length=256, emb_dim=384, n_heads=6, n_layers=6),
    # `gptlab train`'s default, tuned for 2.5-10 minutes on 2 CPU cores (see the README's time to quality).
    # Small and short: on a CPU this budget buys a few million tokens, and a model this size turns them
    # into more optimizer steps than a wider one. Dropout 0.1 on the embeddings and shortcuts: the
    # embedded corpus is small enough that 5 minutes are a dozen epochs (1.61 bits/byte at 300 s with it,
    # 1.85 without, 1.73 with 0.2); none on the attention weights, which would leave CPU attention's fused
    # kernel for one twice as slow.
    "gpt2-micro": GPTConfig(context_length=128, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.1, attn_drop_rate=0.0),
}


def get_config(name: str, **overrides) -> GPTConfig:
    """A preset by name, with any fields overridden (None values are ignored)."""
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    changes = {key: value for key, value in overrides.items() if value is not None}
    return PRESETS[name].replace(**changes)
