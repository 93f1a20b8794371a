"""The one KV cache, against the uncached model and the explicit mask rule: left-padded rows, rows of
different lengths (continuous batching), multi-token steps over ragged rows, and the static layout."""

from __future__ import annotations

import pytest
import torch
from generation_helpers import SHAPES, random_model, random_prompts, uncached_logits

from gptlab.inference.cache import KVCache
from gptlab.inference.decoder import next_token_logits

CFG = SHAPES["untied, no bias"]


def expected_mask(written: list[list[int]], keys: int, padding: list[int]) -> torch.Tensor:
    """Key slot j visible to the token in slot i of row b iff j <= i and j is past b's padding, or j == i."""
    return torch.tensor(
        [
            [[j <= i and (j >= pad or j == i) for j in range(keys)] for i in slots]
            for slots, pad in zip(written, padding)
        ]
    )[:, None]


def test_steps_say_positions_and_mask_by_the_explicit_rule():
    cache = KVCache(CFG, 3, ragged=True)
    cache.reset(torch.tensor([2, 0, 1]))
    step = cache.append(4)  # a left-padded prefill: slots 0..3 of every row
    assert step.positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 1, 2]]
    assert torch.equal(step.mask, expected_mask([[0, 1, 2, 3]] * 3, 4, [2, 0, 1]))
    assert step.where == (3, 4, slice(0, 4))
    step = cache.append(1)  # padded rows: a mask even for one token
    assert torch.equal(step.mask, expected_mask([[4]] * 3, 5, [2, 0, 1]))
    assert step.positions.tolist() == [[2], [4], [3]]

    cache.reset()
    assert cache.append(1).mask is None  # one token, equal rows, no padding: every key is visible
    cache.lengths = [1, 5, 3]  # rows of different lengths, as continuous batching leaves them
    step = cache.append(2)
    assert step.positions.tolist() == [[1, 2], [5, 6], [3, 4]]
    assert torch.equal(step.mask, expected_mask([[1, 2], [5, 6], [3, 4]], 7, [0, 0, 0]))
    assert cache.lengths == [3, 7, 5]


@torch.inference_mode()
def test_ragged_rows_give_each_rows_uncached_logits():
    """Prompts of 3, 9 and 6 tokens prefilled alone, stored in one ragged cache, then steps of one token
    for all three and a step of three tokens each: every row's logits are the uncached model's."""
    model = random_model(CFG)
    prompts = random_prompts(CFG, [3, 9, 6])
    cache, alone = KVCache(CFG, 3, ragged=True), KVCache(CFG, 1)
    for row, prompt in enumerate(prompts):
        alone.reset()
        next_token_logits(model, torch.tensor([prompt]), alone)
        cache.store(row, alone, len(prompt))
    assert cache.lengths == [3, 9, 6]
    for new_tokens in ([[5], [7], [11]], [[1], [2], [3]], [[4, 8, 15], [16, 23, 42], [0, 1, 2]]):
        logits = next_token_logits(model, torch.tensor(new_tokens), cache)  # (3, V)
        for row, tokens in enumerate(new_tokens):
            prompts[row] += tokens
            assert (logits[row] - uncached_logits(model, prompts[row])).abs().max() <= 1e-5
    cache.move(1, 0)  # row 1 takes row 0's place, as when row 0 leaves the batch
    cache.active = 1
    logits = next_token_logits(model, torch.tensor([[9]]), cache)
    assert (logits[0] - uncached_logits(model, prompts[1] + [9])).abs().max() <= 1e-5


@torch.inference_mode()
def test_static_layout_reads_every_slot_behind_the_mask():
    model = random_model(CFG)
    static = KVCache(CFG, 2, static=True)
    static.reset(torch.tensor([0, 2]))
    step = static.append(3)
    assert step.mask.shape == (2, 1, 3, CFG.context_length) and step.where[1] is None
    assert torch.equal(step.mask, expected_mask([[0, 1, 2]] * 2, CFG.context_length, [0, 2]))
    assert int(static.next_slot) == 3 and static.lengths == [0, 0]  # the next slot lives in a tensor
    static.reset(torch.tensor([0, 2]))
    logits = next_token_logits(model, torch.tensor([[1, 2, 3], [0, 0, 4]]), static)
    assert (logits[1] - uncached_logits(model, [4])).abs().max() <= 1e-5


def test_bad_use_is_refused():
    cache = KVCache(CFG, 1)
    cache.append(CFG.context_length)
    with pytest.raises(ValueError, match=f"cache holds {CFG.context_length} tokens"):
        cache.append(1)
    with pytest.raises(AssertionError, match="ragged=True"):
        cache.store(0, KVCache(CFG, 1), 1)  # an uninitialised row read as if written: only a zeroed cache may


@torch.inference_mode()
def test_a_left_padded_row_stored_in_a_ragged_cache_keeps_its_padding_hidden():
    model = random_model(CFG)
    prompt = random_prompts(CFG, [4])[0]
    alone, cache = KVCache(CFG, 1), KVCache(CFG, 2, ragged=True)
    alone.reset(torch.tensor([2]))  # two padding slots, then the prompt
    next_token_logits(model, torch.tensor([[0, 0, *prompt]]), alone)
    cache.store(0, alone, 6)
    cache.active = 1
    step_logits = next_token_logits(model, torch.tensor([[7]]), cache)
    assert (step_logits[0] - uncached_logits(model, prompt + [7])).abs().max() <= 1e-5
