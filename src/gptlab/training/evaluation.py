"""Evaluation: loss, perplexity and bits per byte over every token of a text, each predicted once."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, validation_batches
from ..model import GPTModel
from .fsdp import is_sharded
from .runtime import Runtime, max_across_ranks, sum_across_ranks


def autocast(runtime: Runtime, dtype: str):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=torch.bfloat16)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean nats per token
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.loss * self.tokens / math.log(2) / self.bytes

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}

    def format(self) -> str:
        return (
            f"loss {self.loss:.4f}  perplexity {self.perplexity:.2f}  bits/byte {self.bits_per_byte:.4f}  "
            f"({self.tokens:,} tokens, {self.bytes:,} bytes)"
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    n_bytes: int,
    batch_size: int,
    runtime: Runtime = Runtime(torch.device("cpu")),
    dtype: str = "float32",
    max_targets: int | None = None,
    seed: int = 0,
    token_bytes: np.ndarray | None = None,
) -> EvalResult:
    """Loss over every token of `tokens` (each predicted once), in non-overlapping context windows.
    Under DDP each rank takes its share of the windows and the sums are reduced.

    max_targets: a bounded estimate, on the seeded windows validation_batches picks (the same at every
    call); its bytes are then the scored targets' own, from token_bytes (UTF-8 bytes per token id),
    instead of n_bytes."""
    was_training = model.training
    model.eval()
    context = unwrap(model).cfg.context_length
    total_loss, total_tokens, total_bytes = 0.0, 0, 0
    windows = dict(max_targets=max_targets, seed=seed)
    # A sharded model gathers each block's weights from every process at each forward pass, so every
    # process must run as many passes as the busiest one: the others run a dummy batch and discard it.
    extra = 0
    if is_sharded(model):
        mine = sum(1 for _ in validation_batches(tokens, context, batch_size, runtime.rank, runtime.world, **windows))
        extra = max_across_ranks(runtime, mine) - mine
    with autocast(runtime, dtype):
        for x, y in validation_batches(tokens, context, batch_size, runtime.rank, runtime.world, **windows):
            if max_targets is not None:
                total_bytes += int(token_bytes[y[y != IGNORE_INDEX]].sum())
            x, y = torch.from_numpy(x).to(runtime.device), torch.from_numpy(y).to(runtime.device)
            total_loss += loss_fn(model, x, y, reduction="sum").item()
            total_tokens += int((y != IGNORE_INDEX).sum())
        for _ in range(extra):
            model(torch.zeros(1, context, dtype=torch.long, device=runtime.device))
    total_loss, total_tokens, total_bytes = sum_across_ranks(runtime, total_loss, total_tokens, total_bytes)
    model.train(was_training)
    return EvalResult(
        total_loss / total_tokens, int(total_tokens), n_bytes if max_targets is None else int(total_bytes)
    )


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside a DistributedDataParallel wrapper (--compile compiles the loss, not the module)."""
    return getattr(model, "module", model)
