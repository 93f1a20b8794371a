"""`gptlab train` and `gptlab eval` from the command line: Ctrl-C and --resume, divergence, the refusals
of bad input (one line, exit 2, nothing touched), the evaluation figures, and two processes under
torchrun training exactly like one."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import QUIET, TINY_MODEL
from test_train import (  # noqa: F401 (one_thread is an autouse fixture)
    TEXT,
    explicit_validation_nll,
    one_thread,
    poison_loss_from_step,
    press_ctrl_c_after,
    train_losses,
    validation_losses,
)

from gptlab.checkpoint import load_gptlab_checkpoint, read_config, save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.model import GPTModel
from gptlab.tokenizer import CharTokenizer

MODEL_OPTIONS = TINY_MODEL


def train_argv(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        *MODEL_OPTIONS,
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--eval-interval",
        "2",
        *QUIET,
        *extra,
    ]


def gptlab(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, pattern: str) -> None:
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gptlab train: error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, err), err


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-step run of the tiny model, made once; tests that change it work on a copy."""
    folder = tmp_path_factory.mktemp("finished")
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    assert main(train_argv(corpus, folder / "run", folder / "cache")) == 0
    return corpus, folder / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> tuple[Path, Path]:
    corpus, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    return corpus, tmp_path / "run"


# ---------------------------------------------------------------- Ctrl-C and --resume


def test_ctrl_c_saves_and_the_same_command_with_resume_finishes_the_run(corpus, tmp_path, monkeypatch, capsys):
    argv = train_argv(corpus, tmp_path / "run", tmp_path / "cache", "--drop-rate", "0.1")
    with monkeypatch.context() as patch:
        press_ctrl_c_after(patch, 2)
        code, out, err = gptlab(capsys, argv)
    assert code == 0, err
    assert re.search(
        r"stopped by Ctrl-C at step 2; checkpoint saved in .*last; continue with: gptlab train --out "
        r".*run --resume",
        out,
    )
    assert "stopped by interrupt after 2 steps" in out
    assert read_config(tmp_path / "run" / "last")[2]["step"] == 2

    code, out, err = gptlab(capsys, argv + ["--resume"])
    assert code == 0, err
    assert "stopped by max_steps after 4 steps" in out
    uninterrupted = train_argv(corpus, tmp_path / "whole", tmp_path / "cache", "--drop-rate", "0.1")
    assert gptlab(capsys, uninterrupted)[0] == 0
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "whole")


# ---------------------------------------------------------------- divergence


def test_a_nan_loss_exits_with_one_line_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    poison_loss_from_step(monkeypatch, 3)
    code, _, err = gptlab(capsys, train_argv(corpus, tmp_path / "run", tmp_path / "cache"))
    assert_refused(code, err, r"loss became nan at step 3; the last good checkpoint is .*last; lower --lr")
    model, _ = load_gptlab_checkpoint(tmp_path / "run" / "last")
    assert read_config(tmp_path / "run" / "last")[2]["step"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values())


# ---------------------------------------------------------------- bad input


def test_a_missing_data_path_is_refused(tmp_path, capsys):
    code, _, err = gptlab(capsys, train_argv(tmp_path / "missing.txt", tmp_path / "run", tmp_path / "cache"))
    assert_refused(code, err, r"no such file or folder: .*missing\.txt")
    assert folder_contents(tmp_path) == {}


def test_an_empty_corpus_is_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = gptlab(capsys, train_argv(tmp_path / "empty.txt", tmp_path / "run", tmp_path / "cache"))
    assert_refused(code, err, r"the corpus has no text: .*empty\.txt is empty")
    assert folder_contents(tmp_path) == {"empty.txt": b""}


@pytest.mark.parametrize(
    "chars, message",
    [
        (10, r"the training split has 9 tokens but needs at least 17 \(context length 16 \+ 1 target\)"),
        (150, r"the validation split has 15 tokens but needs at least 17 \(context length 16 \+ 1 target\)"),
    ],
)
def test_a_corpus_too_short_for_one_window_is_refused_before_training(tmp_path, capsys, chars, message):
    (tmp_path / "short.txt").write_text(TEXT[:chars])
    code, _, err = gptlab(
        capsys, train_argv(tmp_path / "short.txt", tmp_path / "run", tmp_path / "cache", "--tokenizer", "char")
    )
    assert_refused(code, err, message)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_output_folder_that_cannot_be_made_is_refused(corpus, tmp_path, capsys):
    # Tests run as root, whom file permissions do not stop; a folder inside a regular file stops anyone.
    (tmp_path / "plain-file").write_text("keep me")
    code, _, err = gptlab(capsys, train_argv(corpus, tmp_path / "plain-file" / "run", tmp_path / "cache"))
    assert_refused(code, err, r"cannot write to output folder .*plain-file/run: Not a directory; choose a writable")
    assert (tmp_path / "plain-file").read_text() == "keep me"


def test_an_output_folder_with_other_files_is_refused_and_left_alone(corpus, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    code, _, err = gptlab(capsys, train_argv(corpus, tmp_path / "mine", tmp_path / "cache"))
    assert_refused(code, err, r"output folder .*mine holds files that are not a gptlab run \(notes\.txt")
    assert folder_contents(tmp_path / "mine") == {"notes.txt": b"my notes"}


def test_an_existing_run_needs_resume_or_overwrite(run_copy, tmp_path, capsys):
    corpus, run = run_copy
    before = folder_contents(run)
    code, _, err = gptlab(capsys, train_argv(corpus, run, tmp_path / "cache"))
    assert_refused(code, err, r"already holds a gptlab run; continue it with --resume, replace it with --overwrite")
    assert folder_contents(run) == before

    code, _, err = gptlab(capsys, train_argv(corpus, run, tmp_path / "cache", "--overwrite", "--max-steps", "2"))
    assert code == 0, err
    assert list(train_losses(run)) == [1, 2]  # a new run, not steps appended to the old one


def test_resume_with_a_different_model_is_refused_naming_the_field(run_copy, tmp_path, capsys):
    corpus, run = run_copy
    before = folder_contents(run)
    argv = train_argv(corpus, run, tmp_path / "cache", "--resume", "--max-steps", "6")
    argv[argv.index("--emb-dim") + 1] = "64"
    code, _, err = gptlab(capsys, argv)
    assert_refused(
        code,
        err,
        r"--resume continues the run with its own settings, but --emb-dim is 64 here and 32 in "
        r"the run; drop it",
    )
    assert "n_layers" not in err
    assert folder_contents(run) == before


def test_resume_without_a_run_is_refused(corpus, tmp_path, capsys):
    code, _, err = gptlab(capsys, train_argv(corpus, tmp_path / "run", tmp_path / "cache", "--resume"))
    assert_refused(code, err, r"--resume: no checkpoint at .*run/last")


# ---------------------------------------------------------------- gptlab eval


@pytest.mark.parametrize("pieces", [[(5000, 6000)], [(5000, 5500), (5500, 6000)]], ids=["one-file", "two-files"])
def test_eval_prints_the_loss_perplexity_and_bits_per_byte_of_the_explicit_computation(tmp_path, capsys, pieces):
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, emb_dim=32, n_heads=2, n_layers=2))
    save_model(tmp_path / "model", model, tokenizer)
    texts = [TEXT[start:end] for start, end in pieces]  # 1,000 characters in all, two of them 3-byte quotes
    files = [tmp_path / f"held-out-{i}.txt" for i in range(len(texts))]
    for file, text in zip(files, texts):
        file.write_text(text, encoding="utf-8")

    argv = ["eval", "--checkpoint", str(tmp_path / "model"), "--data", *map(str, files), "--batch-size", "3"]
    code, out, err = gptlab(capsys, argv)
    assert code == 0, err
    shown = re.search(r"loss (\S+)  perplexity (\S+)  bits/byte (\S+)  \(([\d,]+) tokens, ([\d,]+) bytes\)", out)
    loss, perplexity, bits_per_byte = (float(shown[i]) for i in (1, 2, 3))
    tokens, n_bytes = (int(shown[i].replace(",", "")) for i in (4, 5))

    # The files' tokens with an end-of-text token between files; every token but the first is predicted,
    # and the predicted text is every character but the first (an end-of-text token stands for no text).
    ids = [i for index, text in enumerate(texts) for i in [tokenizer.eot_id] * (index > 0) + tokenizer.encode(text)]
    with torch.no_grad():
        nats, count = explicit_validation_nll(model.eval(), np.array(ids), 16)
    target_bytes = sum(len(text.encode("utf-8")) for text in texts) - len(texts[0][0].encode("utf-8"))
    assert target_bytes > 1000 - 1
    assert (tokens, n_bytes) == (count, target_bytes) and count == 1000 + len(texts) - 2
    assert loss == pytest.approx(nats / count, abs=5e-5 + 1e-7)  # printed with 4 decimals
    assert perplexity == pytest.approx(np.exp(nats / count), abs=5e-3 + 1e-7)
    assert bits_per_byte == pytest.approx(nats / np.log(2) / target_bytes, abs=5e-5 + 1e-7)


# ---------------------------------------------------------------- DistributedDataParallel


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch(corpus, tmp_path, capsys):
    # Global batch 8 in micro batches of 2: one process accumulates 4 of them, each of two processes 2.
    options = ("--drop-rate", "0", "--micro-batch-size", "2")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "gptlab",
            *train_argv(corpus, tmp_path / "two", tmp_path / "cache", *options),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-4000:]
    code, one_out, err = gptlab(capsys, train_argv(corpus, tmp_path / "one", tmp_path / "cache", *options))
    assert code == 0, err

    one_losses, two_losses = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert list(two_losses) == [1, 2, 3, 4]
    # float32 sums in another order (the two processes' gradients averaged by all-reduce): measured up to
    # 1.05e-5 (1.8e-6 of the loss) on a 2-core Intel Xeon, within 1e-5 on a 2-core AMD EPYC
    assert list(two_losses.values()) == pytest.approx(list(one_losses.values()), rel=1e-5, abs=1e-5)
    one_val, two_val = validation_losses(tmp_path / "one"), validation_losses(tmp_path / "two")
    assert [step for step, _ in two_val] == [2, 4]  # written once, by rank 0 alone
    assert [loss for _, loss in two_val] == pytest.approx([loss for _, loss in one_val], rel=1e-5, abs=1e-5)
    assert two.stdout.count("stopped by max_steps after 4 steps") == 1 == one_out.count("stopped by max_steps")
    assert sorted(folder_contents(tmp_path / "two")) == sorted(folder_contents(tmp_path / "one"))

    # one process resumes what two saved: their random states cannot be restored, and the run says so
    code, out, err = gptlab(
        capsys, [*train_argv(corpus, tmp_path / "two", tmp_path / "cache", *options), "--resume", "--max-steps", "5"]
    )
    assert code == 0, err
    assert (
        out.count("random state: the run was saved by 2 processes and resumes in 1, so each starts from its seed again")
        == 1
    )
    assert "random state" not in one_out + two.stdout
    assert list(train_losses(tmp_path / "two")) == [1, 2, 3, 4, 5]


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "gptlab", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_fsdp_trains_like_one_process_and_resumes_exactly(corpus, tmp_path, capsys):
    # A constant learning rate, so that a run stopped at step 2 and resumed to 4 follows the same schedule;
    # AdamW and no average named, since that is what an --fsdp run defaults to and the one-process run must
    # match it.
    options = (
        "--drop-rate",
        "0",
        "--micro-batch-size",
        "2",
        "--warmup-steps",
        "0",
        "--min-lr-ratio",
        "1",
        "--optimizer",
        "adamw",
        "--ema-decay",
        "0",
        "--max-steps",
        "4",
    )
    whole = torchrun(train_argv(corpus, tmp_path / "whole", tmp_path / "cache", *options, "--fsdp"))
    assert whole.returncode == 0, whole.stderr[-4000:]
    code, _, err = gptlab(capsys, train_argv(corpus, tmp_path / "one", tmp_path / "cache", *options))
    assert code == 0, err
    one_losses, fsdp_losses = train_losses(tmp_path / "one"), train_losses(tmp_path / "whole")
    assert list(fsdp_losses.values()) == pytest.approx(list(one_losses.values()), abs=1e-5)
    assert [v for _, v in validation_losses(tmp_path / "whole")] == pytest.approx(
        [v for _, v in validation_losses(tmp_path / "one")], abs=1e-5
    )
    assert (tmp_path / "whole" / "last" / "shards").is_dir() and not (
        tmp_path / "whole" / "last" / "optimizer.safetensors"
    ).exists()
    fsdp_model, _ = load_gptlab_checkpoint(tmp_path / "whole" / "last")  # the full model is there too
    one_model, _ = load_gptlab_checkpoint(tmp_path / "one" / "last")
    torch.testing.assert_close(fsdp_model.state_dict(), one_model.state_dict(), atol=1e-5, rtol=1e-4)

    half = torchrun(train_argv(corpus, tmp_path / "half", tmp_path / "cache", *options[:-1], "2", "--fsdp"))
    assert half.returncode == 0, half.stderr[-4000:]
    resumed = torchrun(["train", "--out", str(tmp_path / "half"), "--resume", "--max-steps", "4"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert train_losses(tmp_path / "half") == train_losses(tmp_path / "whole")


def test_gptlab_traceback_shows_where_an_error_came_from(tmp_path, capsys, monkeypatch):
    argv = ["train", "--out", str(tmp_path / "run"), "--max-steps", "1", "--lr", "-1", "--device", "cpu"]
    code, _, err = gptlab(capsys, argv)
    assert code == 2 and err.count("\n") == 1 and "--lr" in err
    monkeypatch.setenv("GPTLAB_TRACEBACK", "1")
    with pytest.raises(ValueError, match="--lr"):
        main(argv)
