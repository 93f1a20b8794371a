"""Choosing the next token: the filters against their definitions and against transformers' logits
processors, one random stream per row (a batch equals its rows run alone), and log-probabilities
against the uncached model."""

from __future__ import annotations

import math

import pytest
import torch
from generation_helpers import (
    SHAPES,
    one_thread,
    random_model,
    random_prompts,
    uncached_logits,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gptlab.inference.generate import generate_ids, generate_tokens
from gptlab.inference.sampling import (
    GenerationOptions,
    Sampler,
    apply_repetition_penalty,
    filter_logits,
)

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def random_logits(rows: int, vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def explicit_filter(
    logits: list[float], temperature: float, top_k: int | None, top_p: float, min_p: float
) -> list[bool]:
    """Which tokens survive, computed one token at a time from the definitions."""
    scaled = [value / temperature for value in logits]
    ranked = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = set(ranked)
    if top_k is not None:
        kept = {i for i in kept if scaled[i] >= scaled[ranked[top_k - 1]]}
    if top_p < 1:
        total = sum(math.exp(scaled[i]) for i in kept)
        probability = {i: math.exp(scaled[i]) / total for i in kept}
        mass_above, nucleus = 0.0, set()
        for i in sorted(kept, key=lambda i: -scaled[i]):
            if mass_above >= top_p:
                break
            nucleus.add(i)
            mass_above += probability[i]
        kept = nucleus
    if min_p > 0:
        best = max(scaled[i] for i in kept)
        kept = {i for i in kept if math.exp(scaled[i] - best) >= min_p}  # p_i / p_max, normalisation cancels
    return [i in kept for i in range(len(logits))]


def test_filters_on_a_worked_example():
    logits = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).log()

    def kept(**kwargs):
        return torch.isfinite(filter_logits(logits, **kwargs))[0].tolist()

    assert kept(temperature=1.0, top_k=2) == [True, True, False, False, False]
    assert kept(temperature=1.0, top_p=0.75) == [True, True, True, False, False]  # 0.5 + 0.2 < 0.75
    assert kept(temperature=1.0, top_p=0.3) == [True, False, False, False, False]  # the top token always stays
    assert kept(temperature=1.0, top_k=2, top_p=0.75) == [True, True, False, False, False]
    # top-p after temperature: at T=3 the probabilities flatten and 0.75 needs four tokens
    assert kept(temperature=3.0, top_p=0.75) == [True, True, True, True, False]
    assert kept(temperature=1.0, min_p=0.3) == [True, True, True, False, False]  # 0.15 >= 0.3 * 0.5 > 0.1
    assert kept(temperature=1.0, min_p=1.0) == [True, False, False, False, False]
    probs = filter_logits(logits, temperature=2.0).softmax(-1)[0]
    expected = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).sqrt()
    assert torch.allclose(probs, expected / expected.sum())


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [
        (1.0, 5, 1.0, 0.0),
        (0.7, None, 0.9, 0.0),
        (1.3, 20, 0.5, 0.0),
        (2.0, 1, 0.99, 0.0),
        (1.0, None, 1.0, 0.05),
        (0.8, 30, 0.95, 0.1),
        (1.5, None, 1.0, 0.5),
    ],
)
def test_filters_match_the_explicit_computation_and_transformers(temperature, top_k, top_p, min_p):
    logits = random_logits(4, 50)
    filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])  # transformers' order, as generate builds it
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        warpers.append(MinPLogitsWarper(min_p))
    theirs = warpers(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isfinite(filtered), torch.isfinite(theirs))
    for row in range(4):
        expected = explicit_filter(logits[row].tolist(), temperature, top_k, top_p, min_p)
        assert torch.isfinite(filtered[row]).tolist() == expected
        kept = torch.tensor(expected)
        # the largest logit is subtracted first, which leaves the softmax as it is
        assert torch.allclose(filtered[row][kept], (logits[row][kept] - logits[row].max()) / temperature)
        assert torch.allclose(filtered[row].softmax(-1), theirs[row].softmax(-1), atol=1e-6)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    """Repeated ids, padding-free rows of different contents, logits of both signs."""
    logits = random_logits(3, 40)
    ids = torch.tensor([[1, 5, 5, 39, 0], [7, 7, 7, 7, 7], [2, 3, 4, 30, 31]])
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter_(1, ids, True)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, penalty), theirs, rtol=0, atol=1e-6)
    assert (logits[seen] > 0).any() and (logits[seen] < 0).any()  # both rules were exercised


def test_repetition_penalty_counts_the_prompt_and_every_generated_token():
    """Greedy with a penalty, step by step against transformers' processor on the uncached model's logits
    given every token so far: the prompt is penalised from the first step, each new token from the next."""
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prompt = random_prompts(cfg, [6])[0]
    options = GenerationOptions(max_new_tokens=20, temperature=0, repetition_penalty=1.8)
    processor = RepetitionPenaltyLogitsProcessor(1.8)
    tokens = list(prompt)
    for _ in range(20):
        scores = processor(torch.tensor([tokens]), uncached_logits(model, tokens)[None])
        tokens.append(int(scores.argmax()))
    assert generate_ids(model, [prompt], options) == [tokens[len(prompt) :]]
    assert tokens[len(prompt) :] != generate_ids(model, [prompt], options.replace(repetition_penalty=1.0))[0]


def test_frequency_presence_penalties_and_logit_bias_follow_openais_formula():
    """Greedy step by step on the uncached logits: logits + bias - frequency · count - presence · (count > 0),
    counting generated tokens only (the prompt is not penalised)."""
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prompt = random_prompts(cfg, [6])[0]
    bias = {prompt[0]: 0.5, 3: -100.0}
    options = GenerationOptions(
        max_new_tokens=15, temperature=0, frequency_penalty=0.7, presence_penalty=0.4, logit_bias=bias
    )
    tokens, counts = list(prompt), torch.zeros(cfg.vocab_size)
    added = torch.zeros(cfg.vocab_size)
    added[list(bias)] = torch.tensor(list(bias.values()))
    for _ in range(15):
        scores = uncached_logits(model, tokens) + added - 0.7 * counts - 0.4 * (counts > 0).float()
        tokens.append(int(scores.argmax()))
        counts[tokens[-1]] += 1
    assert generate_ids(model, [prompt], options) == [tokens[len(prompt) :]]
    assert 3 not in tokens[len(prompt) :]
    assert (
        tokens[len(prompt) :] != generate_ids(model, [prompt], GenerationOptions(max_new_tokens=15, temperature=0))[0]
    )


def test_batched_sampling_equals_each_row_alone_with_its_seed():
    """Row r of a batch (prompt r // num_samples) draws with seed + r, whatever rows are beside it."""
    cfg = SHAPES["untied, no bias"]
    model = random_model(cfg)
    prompts = random_prompts(cfg, [2, 7, 4])
    options = GenerationOptions(
        max_new_tokens=cfg.context_length - 7,
        temperature=1.2,
        top_k=40,
        top_p=0.95,
        min_p=0.02,
        repetition_penalty=1.2,
        seed=11,
        num_samples=2,
    )
    batch = generate_ids(model, prompts, options)
    alone = [
        generate_ids(model, [prompt], options.replace(seed=11 + row, num_samples=1))[0]
        for row, prompt in enumerate(prompt for prompt in prompts for _ in range(2))
    ]
    assert batch == alone
    assert batch[0] != batch[1]  # two samples of one prompt differ
    assert generate_ids(model, prompts[1:2], options.replace(seed=13)) == batch[2:4]  # prompt 1 alone: seed + 1 · 2


def test_seed_reproduces_samples_without_touching_the_global_rng():
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prompts = random_prompts(cfg, [3, 7])
    options = GenerationOptions(max_new_tokens=40, temperature=1.0, top_k=50, seed=1, num_samples=2)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = generate_ids(model, prompts, options)
    unseeded = generate_ids(model, prompts, options.replace(seed=None))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert generate_ids(model, prompts, options) == first
    assert generate_ids(model, prompts, options.replace(seed=2)) != first
    assert generate_ids(model, prompts, options.replace(seed=None)) != unseeded  # a fresh seed each time


def test_sampling_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    rows = 10000  # one draw each, from 10000 generators seeded 0, 1, 2, ...
    options = GenerationOptions(temperature=1.0, top_p=0.8, seed=0)  # keeps 0.4, 0.3, 0.2 → renormalised by 0.9
    draws, _ = Sampler(options, [[0]] * rows, 4, torch.device("cpu")).choose(probs.log().repeat(rows, 1))
    frequency = torch.bincount(draws, minlength=4) / rows
    assert frequency[3] == 0
    assert torch.allclose(frequency[:3], probs[:3] / 0.9, atol=0.02)


def test_logprobs_are_the_raw_models_whatever_the_filters():
    """Each token's log-probability and the top alternatives equal log_softmax of the uncached model's
    logits given the tokens so far: before the penalty, the temperature and the filters."""
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prompts = random_prompts(cfg, [3, 9])
    options = GenerationOptions(
        max_new_tokens=12, temperature=0.7, top_k=10, min_p=0.05, repetition_penalty=1.3, seed=4, logprobs=3
    )
    for prompt, tokens in zip(prompts, generate_tokens(model, prompts, options)):
        so_far = list(prompt)
        for token in tokens:
            expected = uncached_logits(model, so_far).log_softmax(-1)
            assert token.logprob == pytest.approx(float(expected[token.id]), abs=1e-4)
            top = expected.topk(3)
            assert [tid for tid, _ in token.top_logprobs] == top.indices.tolist()
            assert [value for _, value in token.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            so_far.append(token.id)
    ids_only = generate_ids(model, prompts, options)
    assert ids_only == [[token.id for token in row] for row in generate_tokens(model, prompts, options)]
    chosen_only = generate_tokens(model, prompts, options.replace(logprobs=0))[0][0]
    assert chosen_only.logprob is not None and chosen_only.top_logprobs == ()
    assert generate_tokens(model, prompts, options.replace(logprobs=None))[0][0].logprob is None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_k=0), "top-k must be >= 1"),
        (dict(top_p=0.0), r"top-p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top-p must be in \(0, 1\]"),
        (dict(min_p=-0.1), r"min-p must be in \[0, 1\]"),
        (dict(min_p=1.5), r"min-p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition-penalty must be between 0.01 and 100"),
        (dict(repetition_penalty=1e-40), "repetition-penalty must be between 0.01 and 100"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(seed=-1), r"seed must be between 0 and 2\*\*63 - 1"),
        (dict(logprobs=6), "logprobs must be between 0 and 5"),
        (dict(max_new_tokens=-1), "max-new-tokens must be >= 0"),
        (dict(num_samples=0), "num-samples must be >= 1"),
        (dict(stop=("ok", "")), "stop must not be an empty string"),
        (dict(stop="ok"), "stop must be a sequence of strings"),
        (dict(frequency_penalty=2.5), "frequency-penalty must be between -2 and 2"),
        (dict(presence_penalty=-3), "presence-penalty must be between -2 and 2"),
        (dict(logit_bias={5: 101}), "logit-bias values must be between -100 and 100"),
    ],
)
def test_invalid_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        GenerationOptions(**change)


def test_a_tiny_temperature_is_greedy_and_never_nan():
    """Dividing logits by 1e-40 overflows to inf, and inf - inf is NaN, which torch.multinomial refuses: the
    shift by the largest logit keeps every value finite or -inf, so a tiny temperature draws the argmax."""
    logits = random_logits(3, 50) * 10
    for temperature in (1e-40, 1e-30, 1e-8):
        probs = filter_logits(logits, temperature).softmax(dim=-1)
        assert not probs.isnan().any()
        assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.allclose(probs.amax(-1), torch.ones(3))
    options = GenerationOptions(temperature=1e-40, seed=0, repetition_penalty=0.01, frequency_penalty=2)
    ids, _ = Sampler(options, [[1, 2]] * 3, 50, torch.device("cpu")).choose(logits)
    assert ids.tolist() == [
        int(i)
        for i in apply_repetition_penalty(
            logits, torch.zeros(3, 50, dtype=torch.bool).index_fill_(1, torch.tensor([1, 2]), True), 0.01
        ).argmax(-1)
    ]


def test_the_largest_seed_with_several_rows_wraps_to_zero():
    """Row r draws with seed + r modulo 2**63: the largest seed's second row is seed 0's first."""
    from gptlab.inference.sampling import MAX_SEED, offset_seed, row_seeds

    assert row_seeds(MAX_SEED, 3) == [MAX_SEED, 0, 1] and offset_seed(MAX_SEED, 2) == 1 and offset_seed(None, 5) is None
    logits = random_logits(1, 50)
    first = Sampler(GenerationOptions(seed=MAX_SEED, temperature=1.0), [[1]] * 2, 50, torch.device("cpu"))
    zero = Sampler(GenerationOptions(seed=0, temperature=1.0), [[1]], 50, torch.device("cpu"))
    draws = [first.choose(logits.repeat(2, 1))[0].tolist() for _ in range(20)]
    assert [row[1] for row in draws] == [zero.choose(logits)[0].item() for _ in range(20)]


def test_a_padded_vocabulary_never_yields_an_id_the_tokenizer_lacks():
    """A model of 60 logits whose tokenizer has 50 ids: the padded rows, made the most likely by far, are never
    drawn (greedy or sampled), nor listed among the alternatives."""
    logits = random_logits(2, 60)
    logits[:, 50:] += 100
    for options in (
        GenerationOptions(temperature=0, logprobs=5),
        GenerationOptions(temperature=1.0, seed=1, logprobs=5),
    ):
        sampler = Sampler(options, [[1], [2]], 60, torch.device("cpu"), vocab_limit=50)
        for _ in range(10):
            ids, tokens = sampler.choose(logits)
            assert (ids < 50).all() and all(i < 50 for token in tokens for i, _ in token.top_logprobs)
            assert tokens[0].logprob == pytest.approx(logits.log_softmax(-1)[0, ids[0]].item())  # the model's own
