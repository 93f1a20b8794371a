"""Runs as a user makes them on their own text: resume with nothing but --out, limits that are never
hidden, recipes and run.toml, SIGTERM, log lines, and the evaluation of a run's own held-out split."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import QUIET
from test_train import (  # noqa: F401 (one_thread is an autouse fixture)
    TEXT,
    one_thread,
    press_ctrl_c_after,
    read_metrics,
    train_losses,
)
from test_train_cli import MODEL_OPTIONS, assert_refused, gptlab

import gptlab as api
from gptlab.cli import main
from gptlab.training.config import read_toml


@pytest.fixture
def notes(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the default token cache lands here
    path = tmp_path / "notes.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


TINY = [
    *MODEL_OPTIONS,
    "--batch-size",
    "8",
    "--eval-interval",
    "2",
    *QUIET,
]


def test_resume_with_only_out_continues_a_run_on_ones_own_text_exactly(notes, tmp_path, monkeypatch, capsys):
    # The reported defect: resume fell back to the embedded corpus, whose characters the run's vocabulary lacks,
    # and took the learning rate, seed and batch from the new command line.
    settings = ["--data", str(notes), "--max-steps", "4", "--lr", "0.02", "--seed", "7", *TINY]
    with monkeypatch.context() as patch:
        press_ctrl_c_after(patch, 2)
        assert main(["train", "--out", str(tmp_path / "run"), *settings]) == 0
    code, out, err = gptlab(capsys, ["train", "--out", str(tmp_path / "run"), "--resume"])
    assert code == 0, err
    assert "stopped by max_steps after 4 steps" in out
    assert main(["train", "--out", str(tmp_path / "whole"), *settings]) == 0
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "whole")
    learning_rates = [
        {r["step"]: r["lr"] for r in read_metrics(tmp_path / name) if "lr" in r} for name in ("run", "whole")
    ]
    assert learning_rates[0] == learning_rates[1] and len(learning_rates[0]) == 4  # the schedule too, step by step
    assert read_toml(tmp_path / "run" / "last" / "run.toml")["lr"] == 0.02


def test_resume_refuses_a_changed_setting_and_resume_with_overwrite(notes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(notes), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = gptlab(capsys, ["train", "--out", str(run), "--resume", "--lr", "0.5"])
    assert_refused(code, err, r"--lr is 0.5 here and 0.008 in the run; drop it \(a resume may change only")
    code, _, err = gptlab(capsys, ["train", "--out", str(run), "--resume", "--overwrite"])
    assert_refused(code, err, r"--resume continues a run and --overwrite replaces it; give one of them")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_without_a_limit_ones_own_text_trains_for_one_epoch_and_says_so(notes, tmp_path, capsys):
    code, out, err = gptlab(
        capsys,
        [
            "train",
            "--data",
            str(notes),
            "--out",
            str(tmp_path / "run"),
            *TINY,
            "--eval-interval",
            "1000",
            "--tokenizer",
            "char",
        ],
    )
    assert code == 0, err
    steps = -(-5400 // (8 * 16))  # 5,400 training tokens, 128 per step: the step that completes the epoch counts
    assert f"stopped by epochs after {steps} steps" in out
    assert "stop after: 1 epoch (5,400 tokens)" in out and "limits: the default on your own text" in out
    assert f"cosine to 0.0008 at the end of {steps} steps of 128 tokens" in out


def test_a_step_limit_alone_sets_no_time_budget(notes, tmp_path):
    assert main(["train", "--data", str(notes), "--out", str(tmp_path / "run"), "--max-steps", "1", *TINY]) == 0
    settings = read_toml(tmp_path / "run" / "run.toml")
    assert settings["max_steps"] == 1 and settings["time_budget"] is None and settings["epochs"] is None  # unset


def test_a_recipe_then_its_run_toml_reproduce_the_run(notes, tmp_path, capsys):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        f'[data]\ndata = ["{notes}"]\n[model]\nemb_dim = 32\nn_heads = 2\nn_layers = 2\ncontext_length = 16\n'
        '[train]\nbatch_size = 8\nmax_steps = 3\nlr = 0.01\nsample_tokens = 0\ndtype = "float32"\n'
        'device = "cpu"\nlog_interval = 1\nprogress = false\n'
    )
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert read_toml(tmp_path / "a" / "run.toml")["seed"] == 3  # the command line overrides the recipe
    assert main(["train", "--config", str(tmp_path / "a" / "run.toml"), "--out", str(tmp_path / "b")]) == 0
    assert len(train_losses(tmp_path / "a")) == 3 and train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    recipe.write_text("learning_rate = 0.1\n")
    code, _, err = gptlab(capsys, ["train", "--config", str(recipe), "--out", str(tmp_path / "c")])
    assert_refused(code, err, r"unknown key 'learning_rate' in --config .*tiny.toml")
    assert not (tmp_path / "c").exists()


def test_log_lines_reach_stdout_without_the_progress_bar(notes, tmp_path, capsys):
    code, out, _ = gptlab(
        capsys, ["train", "--data", str(notes), "--out", str(tmp_path / "run"), "--max-steps", "2", *TINY]
    )
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("step ") and "|" in line]
    assert len(lines) == 2 and re.fullmatch(
        r"step 2/2 \| loss \d\.\d{4} \| lr \S+ \| grad norm \d+\.\d{3} \| "
        r"[\d,]+ tok/s \| \d+\.\d s",
        lines[1],
    ), lines
    record = [r for r in read_metrics(tmp_path / "run") if "train_loss" in r][-1]
    assert record["grad_norm"] > 0 and f"loss {record['train_loss']:.4f}" in lines[1]


def test_a_warmup_longer_than_the_run_is_shortened_with_a_warning(notes, tmp_path, capsys):
    code, out, _ = gptlab(
        capsys,
        [
            "train",
            "--data",
            str(notes),
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "4",
            "--warmup-steps",
            "50",
            "--lr",
            "0.01",
            *TINY,
        ],
    )
    assert code == 0
    assert "warning: --warmup-steps 50 is longer than the run's 4 steps; warming up over 0 instead" in out
    first = [r for r in read_metrics(tmp_path / "run") if "train_loss" in r][0]
    assert first["lr"] == pytest.approx(0.01)  # no warmup: the cosine starts at the peak rate


def test_eval_without_data_scores_the_runs_own_held_out_split(notes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(notes), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    final = [r for r in read_metrics(run) if "val_loss" in r][-1]
    capsys.readouterr()
    code, out, err = gptlab(capsys, ["eval", "--checkpoint", str(run / "last"), "--device", "cpu"])
    assert code == 0, err
    assert f"{run / 'last'} on the held-out 10% of {notes}:" in out
    loss = float(re.search(r"loss (\d+\.\d+)", out).group(1))
    assert loss == pytest.approx(final["val_loss"], abs=1e-4)
    evaluation = api.evaluate(run / "last", device="cpu")  # the Python API does what the command does
    assert evaluation.result.loss == pytest.approx(final["val_loss"], abs=1e-5)


def test_eval_of_text_outside_a_character_vocabulary_says_what_to_do(notes, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(["train", "--data", str(notes), "--out", str(run), "--max-steps", "1", *TINY, "--tokenizer", "char"]) == 0
    )
    (tmp_path / "other.txt").write_text("Prices in € and ¥ " * 20)
    code, _, err = gptlab(capsys, ["eval", "--checkpoint", str(run / "last"), "--data", str(tmp_path / "other.txt")])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    vocabulary = len(set(TEXT)) + 1
    assert re.search(
        rf"character '[€¥]' is not in this character-level vocabulary \({vocabulary} ids: .*--tokenizer gpt2", err
    ), err


def test_the_python_api_trains_like_the_command(notes, tmp_path):
    options = dict(
        data=[str(notes)],
        max_steps=2,
        context_length=16,
        emb_dim=32,
        n_heads=2,
        n_layers=2,
        batch_size=8,
        log_interval=1,
        sample_tokens=0,
        dtype="float32",
        device="cpu",
        progress=False,
    )
    result = api.train(out=str(tmp_path / "api"), **options)
    assert result.stopped_by == "max_steps" and result.state.step == 2
    assert main(["train", "--data", str(notes), "--out", str(tmp_path / "cli"), "--max-steps", "2", *TINY]) == 0
    assert train_losses(tmp_path / "api") == train_losses(tmp_path / "cli")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--tokenizer", "char", "--merges", "100"],
            r"--merges 100 truncates GPT-2's BPE, but --tokenizer is char; drop one of them",
        ),
        (["--time-budget", "0"], r"--time-budget must be positive, got 0"),
        (["--vocab-size", "10"], r"--vocab-size 10 is smaller than the tokenizer's \d+ ids"),
        (["--data", "no-such-notes.txt"], r"no such file or folder: no-such-notes.txt"),
    ],
)
def test_mistakes_are_one_line_and_leave_no_run_folder(notes, tmp_path, capsys, argv, message):
    args = ["train", "--data", str(notes), "--out", str(tmp_path / "run"), "--max-steps", "1", *TINY, *argv]
    code, _, err = gptlab(capsys, args)
    assert_refused(code, err, message)
    assert not (tmp_path / "run").exists()


def test_help_shows_defaults_and_the_nanogpt_names(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR peak learning rate (nanoGPT's learning_rate) (default: 0.008)" in text
    assert "n_embd" in text and "the global batch" in text and "0 turns clipping off (default: 1.0)" in text
    assert "--config FILE.toml" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["--version"])
    assert exit_code.value.code == 0 and capsys.readouterr().out.strip() == f"gptlab {gptlab_version()}"


def gptlab_version() -> str:
    from importlib.metadata import version

    return version("gptlab")


@pytest.mark.slow
def test_sigterm_saves_last_and_the_run_resumes(notes, tmp_path):
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(notes),
        "--out",
        str(run),
        "--max-steps",
        "100000",
        *TINY,
        "--eval-interval",
        "100000",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gptlab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 60
    while not (run / "metrics.jsonl").exists() or "train_loss" not in (run / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert re.search(
        r"stopped by SIGTERM at step \d+; checkpoint saved in .*last; continue with: gptlab train --out "
        r".*run --resume",
        out,
    )
    step = json.loads((run / "last" / "trainer_state.json").read_text())["trainer"]["step"]
    assert step >= 1 and "Traceback" not in err
    assert main(["train", "--out", str(run), "--resume", "--max-steps", str(step + 1)]) == 0
    assert list(train_losses(run))[-1] == step + 1


def test_best_shares_the_files_of_last_instead_of_copying_them(notes, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(notes), "--out", str(run), "--max-steps", "2", "--lr", "0.01", *TINY]) == 0
    val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert val[-1] == min(val)  # the last evaluation was the best, so best/ is last/ at that step
    for name in ("model.safetensors", "optimizer.safetensors", "config.json"):
        assert os.stat(run / "best" / name).st_ino == os.stat(run / "last" / name).st_ino
    torch.testing.assert_close(
        api.load_model(run / "best")[0].state_dict(), api.load_model(run / "last")[0].state_dict()
    )


@pytest.fixture
def notes_folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    folder = tmp_path / "notes"
    folder.mkdir()
    for index in range(3):
        (folder / f"note-{index}.txt").write_text(TEXT[index * 2000 : (index + 1) * 2000] * 2, encoding="utf-8")
    return folder


def test_a_resume_or_eval_refuses_data_that_changed_and_records_an_accepted_change(notes_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(notes_folder), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    record = json.loads((run / "data.json").read_text())
    assert [Path(source["path"]).name for source in record["sources"]] == ["note-0.txt", "note-1.txt", "note-2.txt"]
    assert record["sources"][0]["bytes"] == len((notes_folder / "note-0.txt").read_bytes()) and not record["changes"]
    code, out, _ = gptlab(capsys, ["eval", "--checkpoint", str(run / "best")])
    assert code == 0 and "changed" not in out
    (notes_folder / "note-3.txt").write_text(TEXT[1000:3000], encoding="utf-8")  # added
    (notes_folder / "note-0.txt").write_text(TEXT[:2000] * 2 + "!", encoding="utf-8")  # modified
    (notes_folder / "note-2.txt").unlink()  # removed
    before = folder_bytes(run)
    code, _, err = gptlab(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "4"])
    assert_refused(
        code,
        err,
        r"the run's data changed since it started \(added \S*note-3.txt; removed \S*note-2.txt; "
        r"modified \S*note-0.txt\): restore it, or pass --accept-data-change",
    )
    assert folder_bytes(run) == before  # nothing lost, nothing written
    code, _, err = gptlab(capsys, ["eval", "--checkpoint", str(run / "best")])
    assert code == 2 and "--accept-data-change to score its held-out split" in err and err.count("\n") == 1
    code, out, _ = gptlab(capsys, ["eval", "--checkpoint", str(run / "best"), "--accept-data-change"])
    assert code == 0 and "the run's data changed since it started (added" in out
    code, out, err = gptlab(
        capsys, ["train", "--out", str(run), "--resume", "--max-steps", "4", "--accept-data-change"]
    )
    assert code == 0, err
    assert "going on with it as --accept-data-change asks" in out and "stopped by max_steps after 4 steps" in out
    record = json.loads((run / "data.json").read_text())
    assert [Path(source["path"]).name for source in record["sources"]] == ["note-0.txt", "note-1.txt", "note-3.txt"]
    assert [change["what"] for change in record["changes"]] == ["resume"]
    assert record["changes"][0]["changes"][0].startswith("added")
    code, out, _ = gptlab(capsys, ["eval", "--checkpoint", str(run / "best")])  # the record now names today's data
    assert code == 0 and "changed" not in out


def test_accept_data_change_without_resume_is_refused(notes_folder, tmp_path, capsys):
    code, _, err = gptlab(
        capsys,
        [
            "train",
            "--data",
            str(notes_folder),
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "2",
            "--accept-data-change",
            *TINY,
        ],
    )
    assert_refused(code, err, r"--accept-data-change lets a resumed run go on with changed data; add --resume")
    assert not (tmp_path / "run").exists()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_time_budgeted_run_says_which_resumes_are_exact_and_how_to_extend_it(notes, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = gptlab(
        capsys,
        ["train", "--data", str(notes), "--out", str(run), "--time-budget", "0.5", *TINY, "--eval-interval", "1000"],
    )  # saved when the budget is spent, not before
    assert code == 0, err
    assert "resume: the learning rate and dropout follow the clock toward the time budget" in out
    assert "a resume is exact under --max-steps, --max-tokens or --epochs alone" in out
    code, out, err = gptlab(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "1000"])
    assert code == 0, err
    assert "(limits: the run's own with --max-steps 1000 from here; it stops at whichever comes first)" in out
    assert re.search(
        r"nothing to train: the run's time budget of 0.5 s is spent \(\d+ s trained\) and a run stops "
        r"at whichever limit comes first; to train on, resume with a larger --time-budget",
        out,
    ), out
    steps = max(train_losses(run))
    code, out, err = gptlab(capsys, ["train", "--out", str(run), "--resume", "--time-budget", "1.5"])
    assert code == 0 and max(train_losses(run)) > steps, err  # a larger budget trains on


def test_a_step_limited_run_resumed_with_nothing_left_says_so(notes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(notes), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    code, out, _ = gptlab(capsys, ["train", "--out", str(run), "--resume"])
    assert code == 0
    assert (
        "nothing to train: the run's --max-steps is reached at step 2; to train on, resume with a larger --max-steps"
        in out
    )
