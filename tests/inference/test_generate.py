"""Generation: the cached decoder and the public `generate` against the textbook's uncached loop,
batches against one prompt at a time, streaming, stop strings and end-of-text."""

from __future__ import annotations

import importlib

import pytest
import torch
from generation_helpers import (
    MULTIBYTE,
    SHAPES,
    one_thread,
    random_model,
    random_prompts,
    scripted_model,
    uncached_logits,
)

from gptlab import generate
from gptlab.config import GPTConfig
from gptlab.inference.cache import KVCache
from gptlab.inference.decoder import Decoder, DecoderSettings
from gptlab.inference.generate import (
    GenerationOptions,
    TextAssembler,
    decode_steps,
    generate_ids,
    generate_text,
    generate_uncached,
    stream_batch,
    stream_text,
)
from gptlab.tokenizer import load_tokenizer

GREEDY = GenerationOptions(max_new_tokens=200, temperature=0)

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


# --- the cache ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_cached_greedy_equals_textbook_loop_tokens_and_logits(shape):
    """keep = context_length re-runs the last context_length tokens once the cache is full, which is exactly
    what the textbook loop does at every step: 200 tokens (past the context) must agree everywhere."""
    cfg = SHAPES[shape]
    model = random_model(cfg)
    for prompt in random_prompts(cfg, [1, 5, cfg.context_length, cfg.context_length + 7]):
        expected = generate_uncached(model, torch.tensor([prompt]), 200)[0, len(prompt) :].tolist()
        assert generate_ids(model, [prompt], GREEDY, settings=DecoderSettings(keep=cfg.context_length)) == [expected]

        decoder = Decoder(model, 1, DecoderSettings(keep=cfg.context_length))
        tokens = prompt[-cfg.context_length :]
        logits = decoder.prefill([tokens])[0]
        for _ in range(200):
            reference = uncached_logits(model, tokens[-cfg.context_length :])
            assert (logits - reference).abs().max() <= 1e-4
            next_id = logits.argmax()
            tokens.append(int(next_id))
            logits = decoder.step(next_id[None])[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_sliding_window_past_the_context_follows_its_documented_windows(shape):
    """Default keep = context_length // 2: the logits after position n come from the model run uncached on
    the last w tokens, w = len(prompt), +1 per step, back to keep when the context is full."""
    cfg = SHAPES[shape]
    model = random_model(cfg)
    keep = cfg.context_length // 2
    for prompt in random_prompts(cfg, [3, cfg.context_length - 1]):
        tokens, window, windows_seen = list(prompt), len(prompt), set()
        expected = []
        for _ in range(200):
            windows_seen.add(window)
            next_id = int(uncached_logits(model, tokens[-window:]).argmax())
            expected.append(next_id)
            tokens.append(next_id)
            window = keep if window == cfg.context_length else window + 1
        assert generate_ids(model, [prompt], GREEDY) == [expected]
        assert {keep, cfg.context_length} <= windows_seen  # the window did slide, several times over 200 tokens
        textbook = generate_uncached(model, torch.tensor([prompt]), 200)[0, len(prompt) :].tolist()
        agree_until = cfg.context_length - len(prompt) + 1  # tokens made before the cache first fills
        assert expected[:agree_until] == textbook[:agree_until]


def test_cache_refuses_to_overflow_and_generation_leaves_the_model_alone():
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    before = {name: (tensor.clone(), tensor.stride()) for name, tensor in model.state_dict().items()}
    cache = KVCache(cfg, rows=1)
    with torch.inference_mode():
        model(torch.zeros(1, cfg.context_length, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="cache holds 32 tokens"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)
    generate_ids(model, [[1, 2]], GenerationOptions(max_new_tokens=5))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name][0]) and tensor.stride() == before[name][1], name
    assert model.out_head.weight is model.tok_emb.weight  # still tied, still one copy


@pytest.mark.parametrize("shape", SHAPES)
def test_public_generate_is_the_cached_textbook_loop(shape):
    """gptlab.generate: the same tokens as generate_uncached for a batch, past the context too, on the
    ids' dtype and device; and its controls are GenerationOptions'."""
    cfg = SHAPES[shape]
    model = random_model(cfg)
    ids = torch.tensor(random_prompts(cfg, [5, 5, 5]))  # (3, 5)
    expected = generate_uncached(model, ids, 2 * cfg.context_length)
    ours = generate(model, ids, 2 * cfg.context_length)
    assert ours.dtype == ids.dtype and ours.device == ids.device and torch.equal(ours, expected)
    assert torch.equal(generate(model, ids, 0), ids)

    sampled = generate(model, ids, 10, temperature=1.0, top_k=5, seed=3, num_samples=2)  # (6, 15)
    assert sampled.shape == (6, 15) and torch.equal(sampled[:, :5], ids.repeat_interleave(2, dim=0))
    assert torch.equal(generate(model, ids, 10, temperature=1.0, top_k=5, seed=3, num_samples=2), sampled)
    options = GenerationOptions(max_new_tokens=10, temperature=1.0, top_k=5, seed=3, num_samples=2)
    assert sampled[:, 5:].tolist() == generate_ids(model, ids.tolist(), options)


@pytest.mark.parametrize(
    "sampling, message",
    [
        (dict(stop=("a",)), "generate returns ids only: for stop strings use generate_text"),
        (dict(logprobs=2), "for logprobs generate_tokens"),
        (dict(top_p=2.0), "top-p must be in"),
        (dict(colour="red"), "colour"),
    ],
)
def test_public_generate_refuses_what_it_cannot_do(sampling, message):
    model = random_model(SHAPES["tied, qkv bias"])
    with pytest.raises((ValueError, TypeError), match=message):
        generate(model, torch.tensor([[1, 2]]), 3, **sampling)


# --- batches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_left_padded_batch_equals_one_prompt_at_a_time(shape):
    cfg = SHAPES[shape]
    model = random_model(cfg)
    prompts = random_prompts(cfg, [1, 4, 9, 13])
    options = GenerationOptions(max_new_tokens=cfg.context_length - 13, temperature=0)  # within the context
    one_at_a_time = [generate_ids(model, [prompt], options)[0] for prompt in prompts]
    assert generate_ids(model, prompts, options) == one_at_a_time
    for prompt, tokens in zip(prompts, one_at_a_time):
        assert (
            generate_uncached(model, torch.tensor([prompt]), options.max_new_tokens)[0, len(prompt) :].tolist()
            == tokens
        )

    # past the context the batch slides when its longest row fills the cache, and carries on
    longer = generate_ids(model, prompts, options.replace(max_new_tokens=3 * cfg.context_length))
    assert [len(tokens) for tokens in longer] == [3 * cfg.context_length] * len(prompts)
    assert [tokens[: options.max_new_tokens] for tokens in longer] == one_at_a_time

    with torch.inference_mode():  # the logits too, not only their argmax
        batched = Decoder(model, len(prompts)).prefill(prompts)
        for row, prompt in enumerate(prompts):
            assert (batched[row] - uncached_logits(model, prompt)).abs().max() <= 1e-4


def test_num_samples_repeats_each_prompt_in_order():
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prompts = random_prompts(cfg, [2, 5])
    greedy = GenerationOptions(max_new_tokens=6, temperature=0, num_samples=3)
    rows = generate_ids(model, prompts, greedy)
    assert rows[0:3] == [generate_ids(model, [prompts[0]], greedy.replace(num_samples=1))[0]] * 3
    assert rows[3:6] == [generate_ids(model, [prompts[1]], greedy.replace(num_samples=1))[0]] * 3


# --- text: streaming, stop strings, end-of-text -------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def scripted(tokenizer):
    """Continues "Hi" with MULTIBYTE, then end-of-text."""
    script = tokenizer.encode("Hi") + tokenizer.encode(MULTIBYTE) + [tokenizer.eot_id]
    return scripted_model(script)


def test_text_assembler_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    token_bytes = [tokenizer.decode_bytes([i]) for i in ids]
    partial = [
        data for data in token_bytes if data.decode("utf-8", errors="replace") != data.decode("utf-8", errors="ignore")
    ]
    assert len(partial) >= 4  # the test means something: tokens end or start inside characters
    text = TextAssembler()
    pieces = [text.feed(data) for data in token_bytes] + [text.finish()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == MULTIBYTE
    assert sum(1 for piece in pieces if piece) < len(ids)  # characters split over tokens came out whole


def test_text_assembler_flushes_an_unfinished_character_like_decode(tokenizer):
    data = "日".encode()
    text = TextAssembler()
    assert text.feed(data[:2]) == ""
    assert text.finish() == data[:2].decode("utf-8", errors="replace") == "\ufffd"


def test_stream_text_yields_whole_characters_and_stops_at_end_of_text(scripted, tokenizer):
    pieces = list(stream_text(scripted, tokenizer, "Hi", GenerationOptions(max_new_tokens=100, temperature=0)))
    assert all(piece and "\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == MULTIBYTE  # end-of-text ended it, well before 100 tokens, and is not shown
    assert len(pieces) < len(tokenizer.encode(MULTIBYTE))


def test_stream_concatenates_to_the_full_decode_of_sampled_tokens(tokenizer):
    """Random weights over GPT-2's vocabulary: whatever bytes come out, the pieces join to decode(ids)."""
    model = random_model(GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1))
    options = GenerationOptions(max_new_tokens=60, temperature=1.0, seed=5)
    ids = generate_ids(model, [tokenizer.encode("Hello")], options, eot_id=tokenizer.eot_id)[0]
    assert "".join(stream_text(model, tokenizer, "Hello", options)) == tokenizer.decode(ids)


@pytest.mark.parametrize(
    "stop, expected",
    [
        (("日本",), " 🙂 "),  # inside a word, across tokens that split characters
        (("naïve", "語"), " 🙂 日本"),  # the earliest of several
        (("ok", " 🙂"), ""),  # at the very start
        (("テスト ok!",), MULTIBYTE),  # never completed: the held-back text comes out at the end
    ],
)
def test_stop_strings_end_the_text_and_are_not_returned(scripted, tokenizer, stop, expected):
    options = GenerationOptions(max_new_tokens=100, temperature=0, stop=stop)
    pieces = list(stream_text(scripted, tokenizer, "Hi", options))
    assert "".join(pieces) == expected
    assert not any(s in piece for s in stop for piece in pieces)


def test_stop_string_ends_generation_early(scripted, tokenizer, monkeypatch):
    options = GenerationOptions(max_new_tokens=100, temperature=0, stop=("日本",))
    steps = sum(1 for _ in decode_steps(scripted, [tokenizer.encode("Hi")], options))
    assert steps == 100  # the raw loop runs as long as asked ...
    consumed = 0

    def counting_steps(*args, **kwargs):
        nonlocal consumed
        for ids in decode_steps(*args, **kwargs):
            consumed += 1
            yield ids

    monkeypatch.setattr(importlib.import_module("gptlab.inference.generate"), "decode_steps", counting_steps)
    assert generate_text(scripted, tokenizer, ["Hi"], options) == [" 🙂 "]
    # ... but the text layer stops at the token that completes "日本": " 🙂", " \xe6", "\x97", "\xa5", "\xe6\x9c", "\xac"
    assert consumed == 6


def test_text_batch_of_prompts_and_samples(scripted, tokenizer):
    options = GenerationOptions(max_new_tokens=30, temperature=0, num_samples=2)
    texts = generate_text(scripted, tokenizer, ["Hi", "Hi"], options)
    assert texts == [MULTIBYTE] * 4
    rows = {row for row, _ in stream_batch(scripted, tokenizer, ["Hi"], options)}
    assert rows == {0, 1}
