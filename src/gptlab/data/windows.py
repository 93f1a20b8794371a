"""Training windows and validation batches cut from a token array."""


from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .corpus import DataError
from .order import EpochOrder

IGNORE_INDEX = -100  # target id that torch.nn.functional.cross_entropy leaves out (its default ignore_index)


# ----------------------------------------------------------------------------------------------
# Windows


def check_length(tokens: np.ndarray, context_length: int, name: str) -> None:
    if context_length < 1:
        raise DataError(f"context length must be >= 1, got {context_length}")
    if len(tokens) < context_length + 1:
        raise DataError(
            f"the {name} has {len(tokens)} tokens but needs at least {context_length + 1} "
            f"(context length {context_length} + 1 target); use more text or a shorter context length"
        )


def token_rows(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> np.ndarray:
    """tokens[start : start + context_length + 1] for each start, as int64 rows (len(starts), context_length + 1)."""
    return tokens[np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context_length + 1)].astype(np.int64)


@dataclass(frozen=True)
class Batch:
    inputs: np.ndarray  # (rows, context_length) int64
    targets: np.ndarray  # (rows, context_length) int64: inputs shifted by one token
    epoch: int
    index: int  # position of the batch's first window in this epoch's order
    resume_at: tuple[int, int]  # (epoch, index) to pass to batches() to continue right after this batch


class TokenWindows:
    """Training samples: `context_length` input tokens and the next-token targets, one window starting
    every `stride` tokens (stride == context_length: non-overlapping)."""

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int, name: str = "training split"):
        check_length(tokens, context_length, name)
        if stride < 1:
            raise DataError(f"stride must be >= 1, got {stride}")
        self.tokens, self.context_length, self.stride = tokens, context_length, stride
        self.count = (len(tokens) - context_length - 1) // stride + 1

    def __len__(self) -> int:
        return self.count

    def windows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of the given windows, each (len(indices), context_length) int64."""
        rows = token_rows(self.tokens, np.asarray(indices, dtype=np.int64) * self.stride, self.context_length)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def epoch_order(self, epoch: int, seed: int) -> EpochOrder:
        """The windows' order in an epoch: a permutation that depends only on (seed, epoch), computed for
        the positions asked (order[a:b]), so its memory does not grow with the number of windows."""
        return EpochOrder(self.count, seed, epoch)

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.count // batch_size

    def batches(
        self,
        batch_size: int,
        seed: int,
        start_epoch: int = 0,
        start_index: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Global batches of `batch_size` windows, endlessly, epoch after epoch in each epoch's order; the
        windows left over at an epoch's end (fewer than batch_size) are skipped that epoch.

        Resume exactly with start_epoch, start_index = batch.resume_at of the last batch used. With
        world_size > 1, rank r gets rows [r * b, (r + 1) * b) of each global batch, b = batch_size //
        world_size: the global batches are the same for any world size.
        """
        if batch_size < 1 or batch_size % world_size:
            raise DataError(f"batch size {batch_size} must be a positive multiple of the world size {world_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if batch_size > self.count:
            raise DataError(
                f"batch size {batch_size} is more than the {self.count} windows of the data; "
                "lower the batch size or the stride, or use more text"
            )
        if not 0 <= start_index <= self.count:
            raise DataError(f"start index {start_index} is outside 0..{self.count}")
        rows = batch_size // world_size
        epoch, index = start_epoch, start_index
        while True:
            order = self.epoch_order(epoch, seed)
            while index + batch_size <= self.count:
                inputs, targets = self.windows(order[index + rank * rows : index + (rank + 1) * rows])
                after = (epoch, index + batch_size) if index + 2 * batch_size <= self.count else (epoch + 1, 0)
                yield Batch(inputs, targets, epoch, index, after)
                index += batch_size
            epoch, index = epoch + 1, 0


def validation_batches(
    tokens: np.ndarray, context_length: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) batches of non-overlapping windows in which every token but the first is a
    target exactly once. All windows are full length: when context_length does not divide
    len(tokens) - 1, the last window is moved back to end at the last token, and its targets already
    counted by the window before are set to IGNORE_INDEX. With world_size > 1, rank r takes windows
    r, r + world_size, ...: together the ranks count every target once.
    """
    check_length(tokens, context_length, "validation split")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need batch size >= 1 and 0 <= rank < world size, got {batch_size}, {rank}, {world_size}")
    n_targets = len(tokens) - 1
    starts = list(range(0, n_targets - context_length + 1, context_length))
    covered = starts[-1] + context_length  # full windows score targets tokens[1 : covered + 1]
    if covered < n_targets:
        starts.append(n_targets - context_length)
    # The moved-back last window's first `overlap` targets are already scored by the window before it.
    overlap = covered - starts[-1] if covered < n_targets else 0
    mine = starts[rank::world_size]
    for first in range(0, len(mine), batch_size):
        batch_starts = mine[first : first + batch_size]
        rows = token_rows(tokens, batch_starts, context_length)
        inputs, targets = rows[:, :-1], rows[:, 1:].copy()  # a copy: IGNORE_INDEX must not reach the inputs
        if overlap and batch_starts[-1] == starts[-1]:
            targets[-1, :overlap] = IGNORE_INDEX
        yield inputs, targets
