"""The epoch order: a seeded permutation computed per position, in constant memory (data/order.py)."""

import tracemalloc

import numpy as np
import pytest

from gptlab.data import EpochOrder, TokenWindows

SIZES = [1, 2, 3, 4, 5, 7, 8, 13, 16, 31, 32, 97, 127, 128, 1000, 1024, 4099, 65536]


@pytest.mark.parametrize("size", SIZES)
def test_every_size_gives_a_permutation_that_any_lookup_agrees_with(size):
    for seed, epoch in [(0, 0), (1, 0), (0, 3), (12345, 7)]:
        order = EpochOrder(size, seed, epoch)
        whole = order[:]
        assert whole.dtype == np.int64 and len(order) == size
        assert np.array_equal(np.sort(whole), np.arange(size))
        positions = np.random.default_rng(size).integers(0, size, 50)
        assert np.array_equal(order[positions], whole[positions])  # random access, repeats allowed
        assert np.array_equal(order[size // 3 : size // 2], whole[size // 3 : size // 2])


def test_the_order_depends_only_on_seed_and_epoch():
    first = EpochOrder(1000, seed=5, epoch=2)[:]
    assert np.array_equal(first, EpochOrder(1000, seed=5, epoch=2)[:])
    others = [EpochOrder(1000, 5, 3)[:], EpochOrder(1000, 6, 2)[:], EpochOrder(1000, 2, 5)[:]]
    for other in others:
        assert np.mean(other == first) < 0.01  # about 1 / 1000 of the positions agree by chance


def test_positions_outside_the_order_are_refused():
    order = EpochOrder(10, 0, 0)
    with pytest.raises(IndexError, match=r"positions must be in 0..9"):
        order[np.array([3, 10])]
    with pytest.raises(IndexError):
        order[np.array([-1])]
    with pytest.raises(ValueError, match="at least one window"):
        EpochOrder(0, 0, 0)


@pytest.mark.parametrize("size", [1000, 4099, 65536])
def test_it_mixes_like_a_uniform_random_permutation(size):
    # For a uniform random permutation: corr(position, index) has mean 0 and standard deviation
    # 1/sqrt(size - 1); so does corr(index, next index); the mean displacement |order[i] - i| is size/3.
    positions = np.arange(size)
    bound = 4 / np.sqrt(size - 1)
    for seed in range(10):
        order = EpochOrder(size, seed, 0)[:]
        assert abs(np.corrcoef(positions, order)[0, 1]) < bound
        assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < bound
        assert np.mean(np.abs(order - positions)) / size == pytest.approx(1 / 3, abs=0.02)
        assert np.sum(order == positions) < 10  # fixed points: about 1 on average (Poisson)


def test_small_orders_are_spread_evenly_over_seeds():
    # Where position 0 goes over 2,000 seeds: each of 10 windows about 200 times (chi-square, 9 degrees of
    # freedom; 27.9 is its 99.9% point). And all 6 orders of 3 windows come up about equally often.
    firsts = np.bincount([EpochOrder(10, seed, 0)[np.array([0])][0] for seed in range(2000)], minlength=10)
    assert ((firsts - 200) ** 2 / 200).sum() < 27.9
    orders = {}
    for seed in range(600):
        key = tuple(EpochOrder(3, seed, 1)[:].tolist())
        orders[key] = orders.get(key, 0) + 1
    assert len(orders) == 6 and all(60 < count < 140 for count in orders.values())


def test_windows_of_a_huge_corpus_are_shuffled_in_constant_memory():
    tokens = np.broadcast_to(np.uint16(7), (10**12,))  # a trillion tokens that take no memory
    windows = TokenWindows(tokens, context_length=8, stride=1)
    assert len(windows) == 10**12 - 8  # np.random.permutation would need 8 TB for their order

    tracemalloc.start()
    try:
        np.random.default_rng(0).permutation(10**6)  # the old way, to show numpy's memory is traced
        old_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        stream = windows.batches(64, seed=0, start_epoch=3, start_index=len(windows) - 200)
        batches = [next(stream) for _ in range(4)]  # the epoch's last 3 batches, then the next epoch's first
        new_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert old_peak >= 8 * 10**6 and new_peak < 200_000
    assert [(b.epoch, b.index) for b in batches] == [(3, len(windows) - 200 + 64 * k) for k in range(3)] + [(4, 0)]
    starts = windows.epoch_order(3, seed=0)[len(windows) - 200 : len(windows) - 8]
    assert len(set(starts.tolist())) == 192 and starts.min() >= 0 and starts.max() < len(windows)
    assert batches[0].inputs.shape == (64, 8) and (batches[0].inputs == 7).all()
