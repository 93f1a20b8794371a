"""Bounded evaluation: --eval-tokens scores a seeded subset of whole validation windows (the same at every
evaluation), checked against the explicit cross-entropy of those windows; the run's end and `gptlab
eval` score the whole split; --val-fraction sets the split. No list of every window start is made."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from run_helpers import TINY_RUN, lines_of_text

from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.data import IGNORE_INDEX, token_byte_lengths, validation_batches
from gptlab.model import GPTModel
from gptlab.tokenizer import load_tokenizer
from gptlab.training.evaluation import evaluate


def windows_of(tokens, context, batch, **bounds) -> list[np.ndarray]:
    return [row for inputs, _ in validation_batches(tokens, context, batch, **bounds) for row in inputs]


def test_a_bounded_estimate_takes_the_same_whole_windows_each_time_and_ranks_share_them():
    tokens = np.arange(1000, dtype=np.int64)
    subset = windows_of(tokens, 16, 4, max_targets=100, seed=7)
    assert len(subset) == 7  # ceil(100 / 16) whole windows
    starts = [int(row[0]) for row in subset]
    assert starts == sorted(starts) and all(start % 16 == 0 for start in starts)
    assert [int(row[0]) for row in windows_of(tokens, 16, 2, max_targets=100, seed=7)] == starts  # same windows
    assert [int(row[0]) for row in windows_of(tokens, 16, 4, max_targets=100, seed=8)] != starts  # a seed of its own
    by_rank = [
        int(row[0])
        for rank in range(3)
        for row in windows_of(tokens, 16, 4, max_targets=100, seed=7, rank=rank, world_size=3)
    ]
    assert sorted(by_rank) == starts
    everything = np.stack(windows_of(tokens, 16, 4))
    assert np.array_equal(np.stack(windows_of(tokens, 16, 4, max_targets=10**6)), everything)  # all of it


def test_no_list_of_every_window_is_made():
    """A split of 10^13 tokens (a zero-stride array, no memory) gives its first batch and its bounded
    subset at once: window starts are computed, not listed."""
    tokens = np.broadcast_to(np.int64(3), (10**13,))
    inputs, targets = next(validation_batches(tokens, 1024, 2))
    assert inputs.shape == (2, 1024) and (targets != IGNORE_INDEX).all()
    assert len(windows_of(tokens, 1024, 8, max_targets=4096, seed=0)) == 4


def test_the_bounded_loss_and_bytes_are_those_of_the_chosen_windows():
    tokenizer = load_tokenizer("gpt2", merges=64)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    tokens = np.array(tokenizer.encode("Some validation text to score, over and over. " * 30), dtype=np.int64)
    token_bytes = token_byte_lengths(tokenizer)
    result = evaluate(model, tokens, 0, 4, max_targets=50, seed=3, token_bytes=token_bytes)
    losses, bytes_ = [], 0
    for inputs, targets in validation_batches(tokens, 16, 4, max_targets=50, seed=3):
        logits = model(torch.from_numpy(inputs))
        losses.append(F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).flatten(), reduction="none"))
        bytes_ += len(tokenizer.decode_bytes(targets.flatten().tolist()))
    expected = torch.cat(losses)
    assert result.tokens == len(expected) == 64  # 4 windows of 16 targets
    assert result.loss == pytest.approx(expected.mean().item(), rel=1e-6)
    assert result.bytes == bytes_
    assert result.bits_per_byte == pytest.approx(expected.sum().item() / math.log(2) / bytes_, rel=1e-6)


def test_a_run_estimates_on_a_subset_and_ends_on_the_whole_split(tmp_path, capsys):
    text = lines_of_text(tmp_path / "text.txt", 400)
    out_options = ["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    argv = ["train", "--data", str(text), *out_options, *TINY_RUN, "--eval-tokens", "64", "--val-fraction", "0.2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    finals = [record for record in records if "final_val_loss" in record]
    assert len(finals) == 1 and finals[0]["step"] == 4
    assert f"step 4: val on the whole split loss {finals[0]['final_val_loss']:.4f}" in out
    # gptlab eval scores the run's held-out 20%, whole: the run's final figure
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "last"), "--device", "cpu"]) == 0
    report = capsys.readouterr().out
    assert "on the held-out 20% of" in report
    assert f"loss {finals[0]['final_val_loss']:.4f}" in report
    estimates = [record["val_loss"] for record in records if "val_loss" in record]
    assert len(estimates) == 2 and estimates[-1] != pytest.approx(finals[0]["final_val_loss"], abs=1e-9)


def test_bad_bounds_are_refused_in_one_line(tmp_path, capsys):
    base = ["train", "--out", str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu"]
    assert main([*base, "--eval-tokens", "0"]) == 2
    assert capsys.readouterr().err == "gptlab train: error: --eval-tokens must be positive, got 0\n"
    assert main([*base, "--val-fraction", "1.5"]) == 2
    assert "--val-fraction must be between 0 and 1" in capsys.readouterr().err


def test_val_data_validates_on_its_own_files_and_trains_on_every_file_of_data(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    train_text = lines_of_text(tmp_path / "train" / "a.txt", 300)
    val_text = tmp_path / "val.txt"
    val_text.write_text("".join(f"Held out line {i}: a lazy dog sleeps by the quick fox.\n" for i in range(80)))
    run = tmp_path / "run"
    argv = ["train", "--data", str(train_text.parent), "--val-data", str(val_text), "--out", str(run), *TINY_RUN]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    tokenizer = load_tokenizer("gpt2", merges=128)  # a new model's
    train_ids, val_ids = tokenizer.encode(train_text.read_text()), tokenizer.encode(val_text.read_text())
    assert f"tokens: {len(train_ids):,} training and {len(val_ids):,} validation" in out  # nothing of data held out
    assert f"validation data: read 1 document ({val_text.stat().st_size:,} bytes: {val_text})" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [record["val_loss"] for record in records if "val_loss" in record][-1]  # the whole split, at step 4
    # the run's validation figure is gptlab eval's of the validation file, and eval without --data scores it
    assert main(["eval", "--checkpoint", str(run / "last"), "--data", str(val_text), "--device", "cpu"]) == 0
    assert f"loss {final:.4f}" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run / "last"), "--device", "cpu"]) == 0
    report = capsys.readouterr().out
    assert f"on the whole of the run's validation data, {val_text}" in report and f"loss {final:.4f}" in report
    assert json.loads((run / "data.json").read_text())["sources"][-1]["path"] == str(val_text.resolve())
    val_text.write_text(val_text.read_text() + "one more line\n")  # the validation data changed: a resume refuses
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 2
    assert f"modified {val_text.resolve()}" in capsys.readouterr().err


def test_val_data_with_a_held_out_share_or_a_prepared_cache_is_refused(tmp_path, capsys):
    text = lines_of_text(tmp_path / "text.txt")
    base = ["train", "--data", str(text), "--val-data", str(text), "--out", str(tmp_path / "run"), *TINY_RUN]
    assert main([*base, "--val-fraction", "0.2"]) == 2
    assert capsys.readouterr().err == (
        "gptlab train: error: --val-data validates on its own files, so nothing of --data is held out: drop "
        "--val-fraction\n"
    )
    assert main(["prepare", "--data", str(text), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    capsys.readouterr()
    argv = [
        "train",
        "--prepared",
        str(tmp_path / "c"),
        "--val-data",
        str(text),
        "--out",
        str(tmp_path / "r"),
        *TINY_RUN,
    ]
    assert main(argv) == 2
    assert "--val-data: the prepared cache" in capsys.readouterr().err
