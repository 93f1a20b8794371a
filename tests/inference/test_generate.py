"""Generation: the cached decoder against the textbook's uncached loop, decoding filters against their
explicit formulas, batches against one prompt at a time, streaming, stop strings, and the command line."""

from __future__ import annotations

import importlib
import io
import math

import pytest
import torch

from gptlab.cli import generate as cli
from gptlab.checkpoint import load_model, save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.inference.generate import (
    Decoder,
    GenerationOptions,
    TextAssembler,
    choose_next_tokens,
    decode_steps,
    decoding_model,
    filter_logits,
    generate,
    generate_ids,
    generate_text,
    new_generator,
    stream_batch,
    stream_text,
)
from gptlab.model import GPTModel, KVCache
from gptlab.tokenizer import load_tokenizer

SHAPES = {
    "tied, qkv bias": GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                                qkv_bias=True, tie_embeddings=True),
    "untied, no bias": GPTConfig(vocab_size=61, context_length=24, emb_dim=48, n_heads=3, n_layers=3),
}
GREEDY = GenerationOptions(max_new_tokens=200, temperature=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread only adds synchronisation, which on a busy 2-core machine
    costs ten times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(cfg: GPTConfig, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def random_prompts(cfg: GPTConfig, lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist() for n in lengths]


@torch.inference_mode()
def uncached_logits(model: GPTModel, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens]))[0, -1]  # (V,)


# --- the cache ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_cached_greedy_equals_textbook_loop_tokens_and_logits(shape):
    """keep = context_length re-runs the last context_length tokens once the cache is full, which is exactly
    what the textbook loop does at every step: 200 tokens (past the context) must agree everywhere."""
    cfg = SHAPES[shape]
    model = random_model(cfg)
    for prompt in random_prompts(cfg, [1, 5, cfg.context_length, cfg.context_length + 7]):
        expected = generate(model, torch.tensor([prompt]), 200)[0, len(prompt):].tolist()
        assert generate_ids(model, [prompt], GREEDY, keep=cfg.context_length) == [expected]

        decoder = Decoder(model, 1, keep=cfg.context_length)
        tokens = prompt[-cfg.context_length:]
        logits = decoder.prefill([tokens])[0]
        for _ in range(200):
            reference = uncached_logits(model, tokens[-cfg.context_length:])
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
        textbook = generate(model, torch.tensor([prompt]), 200)[0, len(prompt):].tolist()
        agree_until = cfg.context_length - len(prompt) + 1  # tokens made before the cache first fills
        assert expected[:agree_until] == textbook[:agree_until]


def test_cache_refuses_to_overflow_and_generation_leaves_the_model_alone():
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    before = {name: (tensor.clone(), tensor.stride()) for name, tensor in model.state_dict().items()}
    cache = KVCache(cfg, batch_size=1)
    with torch.inference_mode():
        model(torch.zeros(1, cfg.context_length, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="cache holds 32 tokens"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)
    generate_ids(model, [[1, 2]], GenerationOptions(max_new_tokens=5))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name][0]) and tensor.stride() == before[name][1], name
    assert model.out_head.weight is model.tok_emb.weight  # still tied, still one copy


def test_decoding_layout_is_transposed_in_float32_and_as_stored_in_bfloat16():
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    fp32 = Decoder(model, 1).model
    qkv = fp32.trf_blocks[0].att.qkv.weight
    assert qkv.shape == (3 * cfg.emb_dim, cfg.emb_dim) and qkv.t().is_contiguous()
    assert torch.equal(qkv, model.trf_blocks[0].att.qkv.weight)
    assert fp32.tok_emb.weight.data_ptr() == model.tok_emb.weight.data_ptr()  # shared, not copied
    again = decoding_model(fp32)  # already laid out: nothing is copied, so preparing once is enough
    assert all(again.state_dict()[name].data_ptr() == tensor.data_ptr() for name, tensor in fp32.state_dict().items())
    bf16 = Decoder(model, 1, dtype=torch.bfloat16).model
    assert bf16.trf_blocks[0].att.qkv.weight.is_contiguous()
    assert bf16.out_head.weight.data_ptr() == bf16.tok_emb.weight.data_ptr()  # the tied head converted once


def test_bfloat16_decoding_stays_close_to_float32():
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prompt = random_prompts(cfg, [6])[0]
    with torch.inference_mode():
        fp32 = Decoder(model, 1).prefill([prompt])
        bf16 = Decoder(model, 1, dtype=torch.bfloat16).prefill([prompt])
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05 * fp32.abs().max()


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
        assert generate(model, torch.tensor([prompt]), options.max_new_tokens)[0, len(prompt):].tolist() == tokens

    # past the context the batch slides when its longest row fills the cache, and carries on
    longer = generate_ids(model, prompts, options.replace(max_new_tokens=3 * cfg.context_length))
    assert [len(tokens) for tokens in longer] == [3 * cfg.context_length] * len(prompts)
    assert [tokens[:options.max_new_tokens] for tokens in longer] == one_at_a_time

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


# --- choosing the next token ---------------------------------------------------------------------------


def explicit_filter(logits: list[float], temperature: float, top_k: int | None, top_p: float) -> list[bool]:
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
    probs = filter_logits(logits, temperature=2.0).softmax(-1)[0]
    expected = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).sqrt()
    assert torch.allclose(probs, expected / expected.sum())


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, 1.0), (0.7, None, 0.9), (1.3, 20, 0.5), (2.0, 1, 0.99)])
def test_filters_match_the_explicit_computation(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 3
    filtered = filter_logits(logits, temperature, top_k, top_p)
    for row in range(4):
        expected = explicit_filter(logits[row].tolist(), temperature, top_k, top_p)
        assert torch.isfinite(filtered[row]).tolist() == expected
        kept = torch.tensor(expected)
        assert torch.allclose(filtered[row][kept], logits[row][kept] / temperature)


def test_sampling_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().repeat(20000, 1)  # 20000 rows: one draw each
    options = GenerationOptions(temperature=1.0, top_p=0.8)  # keeps 0.4, 0.3, 0.2 → renormalised by 0.9
    draws = choose_next_tokens(logits, options, new_generator(0, torch.device("cpu")))
    frequency = torch.bincount(draws, minlength=4) / len(draws)
    assert frequency[3] == 0
    assert torch.allclose(frequency[:3], probs[:3] / 0.9, atol=0.015)
    assert torch.equal(choose_next_tokens(logits[:3], GenerationOptions(temperature=0), None), torch.zeros(3, dtype=torch.long))


def test_seed_reproduces_samples_without_touching_the_global_rng():
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prompts = random_prompts(cfg, [3, 7])
    options = GenerationOptions(max_new_tokens=40, temperature=1.0, top_k=50, seed=1, num_samples=2)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = generate_ids(model, prompts, options)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert generate_ids(model, prompts, options) == first
    assert generate_ids(model, prompts, options.replace(seed=2)) != first
    assert first[0] != first[1]  # two samples of one prompt differ


@pytest.mark.parametrize("change, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_k=0), "top-k must be >= 1"),
    (dict(top_p=0.0), r"top-p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top-p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max-new-tokens must be >= 0"),
    (dict(num_samples=0), "num-samples must be >= 1"),
    (dict(stop=("ok", "")), "stop must not be an empty string"),
    (dict(stop="ok"), "stop must be a sequence of strings"),
])
def test_invalid_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        GenerationOptions(**change)


# --- text: streaming, stop strings, end-of-text -------------------------------------------------------

MULTIBYTE = " 🙂 日本語, naïve 😀 テスト ok"


def scripted_model(sequence: list[int], vocab_size: int = 50257, context_length: int = 64) -> GPTModel:
    """A real GPTModel whose greedy (and, at temperature 1, near-certain) successor of sequence[i] is
    sequence[i + 1]: the blocks add nothing (zero output projections), token i of the script embeds as a
    one-hot vector, and the head's row for its successor is that vector after the final LayerNorm."""
    assert len(set(sequence[:-1])) == len(sequence) - 1, "each scripted token needs one successor"
    cfg = GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=len(sequence) + 1, n_heads=1,
                    n_layers=1, drop_rate=0.0)
    model = random_model(cfg)
    with torch.no_grad():
        for block in model.trf_blocks:
            for projection in (block.att.out_proj, block.ff.proj):
                projection.weight.zero_()
                projection.bias.zero_()
        model.pos_emb.weight.zero_()
        model.out_head.weight.zero_()
        for index, (token, successor) in enumerate(zip(sequence, sequence[1:])):
            model.tok_emb.weight[token] = torch.nn.functional.one_hot(torch.tensor(index), cfg.emb_dim) * 10.0
            model.out_head.weight[successor] = 4 * model.final_norm(model.tok_emb.weight[token])  # wide margin
    return model


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
    partial = [data for data in token_bytes if data.decode("utf-8", errors="replace") != data.decode("utf-8", errors="ignore")]
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


@pytest.mark.parametrize("stop, expected", [
    (("日本",), " 🙂 "),  # inside a word, across tokens that split characters
    (("naïve", "語"), " 🙂 日本"),  # the earliest of several
    (("ok", " 🙂"), ""),  # at the very start
    (("テスト ok!",), MULTIBYTE),  # never completed: the held-back text comes out at the end
])
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


# --- the command line ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, scripted, tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "scripted"
    save_model(path, scripted, tokenizer)
    return path


def run_cli(capsys, *args):
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generates_from_a_checkpoint(capsys, checkpoint):
    code, out, err = run_cli(capsys, "--checkpoint", checkpoint, "--prompt", "Hi", "--temperature", "0")
    assert (code, out, err) == (0, "Hi" + MULTIBYTE + "\n", "")
    code, out, _ = run_cli(capsys, "--checkpoint", checkpoint, "--prompt", "Hi", "--stop", "naïve", "--stop", "日",
                           "--max-new-tokens", "40", "--seed", "3", "--dtype", "bfloat16")
    assert (code, out) == (0, "Hi 🙂 \n")
    code, out, _ = run_cli(capsys, "--checkpoint", checkpoint, "--prompt", "Hi", "--max-new-tokens", "1", "--num-samples", "2")
    assert (code, out) == (0, "--- sample 1 of 2 ---\nHi 🙂\n--- sample 2 of 2 ---\nHi 🙂\n")


def test_cli_prompt_file_interactive_empty_and_long_prompts(capsys, checkpoint, scripted, tokenizer, tmp_path, monkeypatch):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Hi\n", encoding="utf-8")
    code, out, _ = run_cli(capsys, "--checkpoint", checkpoint, "--prompt-file", prompt_file, "--temperature", "0")
    assert (code, out) == (0, "Hi" + MULTIBYTE + "\n")

    loads = []
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: loads.append(args) or load_model(*args, **kwargs))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nHi\n"))
    code, out, _ = run_cli(capsys, "--checkpoint", checkpoint, "--interactive", "--temperature", "0", "--stop", "語")
    assert (code, out, len(loads)) == (0, "Hi 🙂 日本\n" * 2, 1)

    code, out, err = run_cli(capsys, "--checkpoint", checkpoint, "--prompt", "", "--max-new-tokens", "5", "--temperature", "0")
    from_end_of_text = generate_ids(scripted, [[tokenizer.eot_id]], GenerationOptions(max_new_tokens=5, temperature=0),
                                    eot_id=tokenizer.eot_id)[0]
    assert (code, out, err) == (0, tokenizer.decode(from_end_of_text) + "\n", "")

    long_prompt = "x." * 40 + "Hi"  # 81 tokens, the last one "Hi"
    code, out, err = run_cli(capsys, "--checkpoint", checkpoint, "--prompt", long_prompt, "--temperature", "0",
                             "--max-new-tokens", "4")
    assert (code, out) == (0, long_prompt + " 🙂 日\n")  # 日 is tokens 2 to 4
    assert err == "warning: the prompt has 81 tokens, more than the model's context_length 64; keeping its last 64\n"


@pytest.mark.parametrize("args, message", [
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--stop", ""], "--stop must not be an empty string"),
    (["--prompt-file", "missing.txt"], "cannot read --prompt-file missing.txt: No such file or directory"),
    ([], "give exactly one of --prompt TEXT, --prompt-file FILE or --interactive"),
    (["--interactive"], "give exactly one of"),
    (["--n-layers", "2"], "--checkpoint takes the model's shape from the checkpoint; drop --n-layers"),
])
def test_cli_bad_arguments_exit_2_with_one_line(capsys, checkpoint, args, message):
    if "--prompt-file" not in args and args != []:
        args = ["--prompt", "Hi", *args]
    code, out, err = run_cli(capsys, "--checkpoint", checkpoint, *args)
    assert code == 2 and out == ""
    assert err.startswith("gptlab generate: error: ") and message in err
    assert err.count("\n") == 1


def test_cli_missing_checkpoint_is_one_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "--checkpoint", tmp_path / "nowhere", "--prompt", "Hi")
    assert code == 2 and out == "" and err.count("\n") == 1 and "nowhere" in err
