"""What the training loop trains on and evaluates with: the TrainingSource interface, and pretraining's
token stream (TrainingData, TokenSource). Fine-tuning tasks implement the same interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from ..data import Batch, TokenWindows, check_length
from .evaluation import EvalResult, evaluate
from .runtime import Runtime


class TrainingSource(Protocol):
    """What the loop trains on and evaluates with. TrainingData (a token stream) is one; fine-tuning
    tasks (instructions, classification) are others."""

    epoch_tokens: int  # tokens in one pass over the training data: what --epochs counts

    def batches(
        self, batch_size: int, seed: int, start_epoch: int, start_index: int, rank: int, world: int
    ) -> Iterator[Batch]:
        """Global batches (this rank's rows of each), endlessly, resumable from Batch.resume_at."""

    def evaluate(self, model: torch.nn.Module, batch_size: int, runtime: Runtime, dtype: str):
        """A validation result with .loss, .format() and .metrics() (recorded as val_<name>).

        A source whose attribute `bounded` is true scores a bounded estimate here (the same subset each
        time, so evaluations compare) and everything in evaluate_whole, which the run's end reports."""


@dataclass(frozen=True)
class TrainingData:
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_bytes: int  # UTF-8 bytes that the validation targets stand for: the bits-per-byte denominator
    sources: list[dict] | None = None  # what the tokens were read from (data_record.py), recorded by a new run
    token_bytes: np.ndarray | None = None  # UTF-8 bytes per token id: a bounded estimate's denominator

    def source(
        self, context_length: int, stride: int | None, eval_tokens: int | None = None, seed: int = 0
    ) -> "TokenSource":
        windows = TokenWindows(self.train_tokens, context_length, stride or context_length)
        check_length(self.val_tokens, context_length, "validation split")  # now, not at the first evaluation
        if eval_tokens is not None and self.token_bytes is None:
            raise ValueError("a bounded evaluation (eval_tokens) needs TrainingData.token_bytes")
        return TokenSource(self, windows, eval_tokens, seed)


@dataclass(frozen=True)
class TokenSource:
    """Pretraining on a token stream: windows of the training split; for validation every token of its
    split, or with eval_tokens a seeded subset of about that many targets (evaluate_whole: all of them)."""

    data: TrainingData
    windows: TokenWindows
    eval_tokens: int | None = None
    seed: int = 0

    @property
    def epoch_tokens(self) -> int:
        return len(self.data.train_tokens)

    @property
    def bounded(self) -> bool:
        return self.eval_tokens is not None

    def batches(self, *args) -> Iterator[Batch]:
        return self.windows.batches(*args)

    def evaluate(self, model, batch_size, runtime, dtype) -> EvalResult:
        if self.eval_tokens is None:
            return self.evaluate_whole(model, batch_size, runtime, dtype)
        return evaluate(
            model,
            self.data.val_tokens,
            self.data.val_bytes,
            batch_size,
            runtime,
            dtype,
            max_targets=self.eval_tokens,
            seed=self.seed,
            token_bytes=self.data.token_bytes,
        )

    def evaluate_whole(self, model, batch_size, runtime, dtype) -> EvalResult:
        return evaluate(model, self.data.val_tokens, self.data.val_bytes, batch_size, runtime, dtype)
