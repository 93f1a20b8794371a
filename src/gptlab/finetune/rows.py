"""Fine-tuning examples as rows of different lengths: shuffled per epoch, batched, right-padded.

A row is (inputs, targets), both (n,) int64, with targets IGNORE_INDEX wherever no loss is taken, so the
one cross-entropy of the training loop serves every task. A batch is padded to its longest row with the
pad id (inputs) and IGNORE_INDEX (targets). Padding goes on the right: under the causal mask no real
token attends to a later position, so a row's logits are the same padded or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..data import IGNORE_INDEX, Batch, DataError, EpochOrder


@dataclass(frozen=True)
class Row:
    inputs: np.ndarray  # (n,) int64
    targets: np.ndarray  # (n,) int64: the next token where a loss is taken, else IGNORE_INDEX


def pad_rows(rows: Sequence[Row], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (len(rows), longest row) int64, right-padded."""
    width = max(len(row.inputs) for row in rows)
    inputs = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        inputs[i, : len(row.inputs)] = row.inputs
        targets[i, : len(row.targets)] = row.targets
    return inputs, targets


class RowBatches:
    """The training rows as the loop's TrainingSource wants them: global batches of `batch_size` rows in
    each epoch's shuffled order, resumable, this rank's share of each. An epoch shows every row once but
    the last len(rows) % batch_size of its order, which wait for the next epoch's order."""

    def __init__(self, rows: Sequence[Row], pad_id: int, context_length: int, batch_size: int, name: str = "examples"):
        if batch_size > len(rows):
            raise DataError(
                f"batch size {batch_size} is more than the {len(rows)} training {name}; lower "
                "--batch-size or give more data"
            )
        self.rows, self.pad_id = list(rows), pad_id
        # What --epochs counts: a step is batch_size rows of (nominally) a full context.
        self.epoch_tokens = (len(rows) // batch_size) * batch_size * context_length

    def batches(
        self, batch_size: int, seed: int, start_epoch: int = 0, start_index: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator[Batch]:
        count, share = len(self.rows), batch_size // world
        epoch, index = start_epoch, start_index
        while True:
            order = EpochOrder(count, seed, epoch)
            while index + batch_size <= count:
                # The whole global batch is padded to one width, so any number of processes pads alike.
                inputs, targets = pad_rows([self.rows[i] for i in order[index : index + batch_size]], self.pad_id)
                after = (epoch, index + batch_size) if index + 2 * batch_size <= count else (epoch + 1, 0)
                mine = slice(rank * share, (rank + 1) * share)
                yield Batch(inputs[mine], targets[mine], epoch, index, after)
                index += batch_size
            epoch, index = epoch + 1, 0


def rank_batches(
    rows: Sequence[Row], pad_id: int, batch_size: int, rank: int = 0, world: int = 1
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Evaluation batches in file order, this rank's rows (rank, rank + world, ...) only: (the rows' indices,
    inputs, targets). Together the ranks see every row once."""
    mine = list(range(rank, len(rows), world))
    for first in range(0, len(mine), batch_size):
        indices = mine[first : first + batch_size]
        yield (indices, *pad_rows([rows[i] for i in indices], pad_id))
