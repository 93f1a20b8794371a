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
    tokens: np.ndarray,
    context_length: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_targets: int | None = None,
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) batches of non-overlapping windows in which every token but the first is a
    target exactly once. All windows are full length: when context_length does not divide
    len(tokens) - 1, the last window is moved back to end at the last token, and its targets already
    counted by the window before are set to IGNORE_INDEX. With world_size > 1, rank r takes windows
    r, r + world_size, ...: together the ranks count every target once.

    max_targets: a bounded estimate instead: ceil(max_targets / context_length) of the whole windows,
    drawn with `seed` (the same ones at every call), in order; all of them when that is every window.
    Window starts are computed, never listed, so a split of any size costs no memory here.
    """
    check_length(tokens, context_length, "validation split")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need batch size >= 1 and 0 <= rank < world size, got {batch_size}, {rank}, {world_size}")
    n_targets = len(tokens) - 1
    whole = range(0, n_targets - context_length + 1, context_length)  # starts of the whole windows
    covered = whole[-1] + context_length  # whole windows score targets tokens[1 : covered + 1]
    # Past them, a last window moved back to end at the last token; its first `overlap` targets are
    # already scored by the window before it.
    overlap = covered - (n_targets - context_length) if covered < n_targets else 0
    count = len(whole) + bool(overlap)
    if max_targets is not None and -(-max_targets // context_length) < count:
        chosen = np.random.default_rng(seed).choice(len(whole), size=-(-max_targets // context_length), replace=False)
        indices, overlap = np.sort(chosen)[rank::world_size].tolist(), 0  # a few windows: a short list
    else:
        indices = range(rank, count, world_size)  # every window, by index: no list of them
    for first in range(0, len(indices), batch_size):
        batch = indices[first : first + batch_size]
        batch_starts = [whole[i] if i < len(whole) else n_targets - context_length for i in batch]
        rows = token_rows(tokens, batch_starts, context_length)
        inputs, targets = rows[:, :-1], rows[:, 1:].copy()  # a copy: IGNORE_INDEX must not reach the inputs
        if overlap and batch[-1] == len(whole):
            targets[-1, :overlap] = IGNORE_INDEX
        yield inputs, targets
