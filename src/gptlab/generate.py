"""Text generation. `generate` is the textbook's loop: crop to the context, run the whole model,
take the last position's logits, pick the argmax, append, repeat."""

from __future__ import annotations

import torch

from .model import GPTModel


@torch.inference_mode()
def generate(model: GPTModel, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: (B, T) ids -> (B, T + max_new_tokens) ids."""
    context = model.cfg.context_length
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])  # (B, T', V)
        next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, next_id], dim=1)
    return ids
