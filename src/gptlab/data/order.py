"""A seeded shuffle of [0, size) computed one position at a time, in constant memory.

np.random.permutation(size) stores 8 bytes per window: at stride 1 that is 8 GB per billion training
tokens, on every rank. EpochOrder computes the same kind of object on demand: order[positions] is the
window shown at each position, for only the positions a batch needs. The shuffle is a keyed Feistel
network, a bijection of the b-bit integers (b = the bits of size - 1), restricted to [0, size) by cycle
walking: a value that lands outside [0, size) is encrypted again until it lands inside. The walk stays a
bijection because it follows the permutation's own cycles, each of which returns to its in-range start.
The domain 2^b is less than 2 * size, so a walk takes at most 2 steps on average. For odd b the two
halves differ by a bit (an unbalanced Feistel network: each round still inverts, the halves swap widths).
"""

from __future__ import annotations

import numpy as np

FEISTEL_ROUNDS = 6  # Luby-Rackoff: 4 rounds of a random function already make a pseudorandom permutation


def mix(values: np.ndarray) -> np.ndarray:
    """A 64-bit avalanche hash (splitmix64's finaliser): each output bit depends on every input bit."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


class EpochOrder:
    """A permutation of [0, size) that depends only on (seed, epoch): order[i] is the window at position i.

    Index it with a slice or an integer array of positions; the result is an int64 array. Memory is a
    few round keys, whatever the size; a lookup costs about 2 * FEISTEL_ROUNDS vectorised rounds.
    """

    def __init__(self, size: int, seed: int, epoch: int):
        if size < 1:
            raise ValueError(f"an epoch order needs at least one window, got {size}")
        self.size = size
        bits = max(2, (size - 1).bit_length())  # at least a bit per half
        self.widths = (bits // 2, bits - bits // 2)  # (high half, low half)
        self.keys = np.random.SeedSequence([seed, epoch]).generate_state(FEISTEL_ROUNDS, np.uint64)

    def __len__(self) -> int:
        return self.size

    def encrypt(self, values: np.ndarray) -> np.ndarray:
        """One pass of the Feistel network over the b-bit integers (a bijection of them)."""
        high_bits, low_bits = self.widths
        high, low = values >> np.uint64(low_bits), values & np.uint64((1 << low_bits) - 1)
        for key in self.keys:
            # (high, low) -> (low, high ^ F(low)): invertible whatever F is; the widths swap with the halves
            high, low = low, high ^ (mix(low ^ key) & np.uint64((1 << high_bits) - 1))
            high_bits, low_bits = low_bits, high_bits
        return (high << np.uint64(low_bits)) | low

    def __getitem__(self, positions: slice | np.ndarray) -> np.ndarray:
        if isinstance(positions, slice):
            positions = np.arange(*positions.indices(self.size))
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.size):
            raise IndexError(f"positions must be in 0..{self.size - 1}")
        values = self.encrypt(positions.astype(np.uint64))
        outside = np.flatnonzero(values >= self.size)
        while outside.size:  # cycle walking: only the values still outside [0, size) go round again
            values[outside] = self.encrypt(values[outside])
            outside = outside[values[outside] >= self.size]
        return values.astype(np.int64)
