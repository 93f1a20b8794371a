"""What gptlab writes obeys the umask (safetensors' own files included), and a path that is not a model folder
gets one line saying what it is and which folder was probably meant. Both on a real two-step training run."""

import os
import shutil
import stat
from pathlib import Path

import pytest

from gptlab import GPTModel, load_tokenizer
from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.interop.hf import export_hf

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 100
TINY_OPTIONS = ["--context-length", "16", "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1", "--batch-size", "4"]


def with_umask(umask: int, action):
    previous = os.umask(umask)
    try:
        return action()
    finally:
        os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    """The permission bits of `folder` ('.') and of everything in it, by relative path."""
    return {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode) for path in [folder, *folder.rglob("*")]}


def expected_modes(folder: Path, file_mode: int, folder_mode: int) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): folder_mode if path.is_dir() else file_mode
        for path in [folder, *folder.rglob("*")]
    }


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A two-step run of a tiny character-level model (it writes last/ and best/), trained under umask 022."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "corpus.txt").write_text(TEXT)
    argv = [
        "train",
        "--data",
        str(folder / "corpus.txt"),
        "--out",
        str(folder / "run"),
        "--cache-dir",
        str(folder / "cache"),
        *TINY_OPTIONS,
        "--max-steps",
        "2",
        "--eval-interval",
        "2",
        "--sample-tokens",
        "0",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert with_umask(0o022, lambda: main(argv)) == 0
    return folder / "run"


def gptlab_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


# --- file modes --------------------------------------------------------------------------------------------


def test_a_training_run_and_its_export_are_0644_and_0755_under_umask_022(run_folder, tmp_path, capsys):
    written = modes(run_folder)
    assert {"last/model.safetensors", "last/optimizer.safetensors", "best/model.safetensors"} <= written.keys()
    assert written == expected_modes(run_folder, 0o644, 0o755)

    convert = ["convert", "--to-hf", str(run_folder / "best"), str(tmp_path / "hf")]
    assert with_umask(0o022, lambda: main(convert)) == 0
    assert "model.safetensors" in modes(tmp_path / "hf")
    assert modes(tmp_path / "hf") == expected_modes(tmp_path / "hf", 0o644, 0o755)


def test_modes_follow_the_umask_rather_than_a_fixed_value(tmp_path):
    tokenizer = load_tokenizer("gpt2", merges=16)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    with_umask(0o027, lambda: save_model(tmp_path / "ckpt", model, tokenizer))
    with_umask(0o027, lambda: export_hf(model, tokenizer, tmp_path / "hf"))
    for folder in (tmp_path / "ckpt", tmp_path / "hf"):
        assert modes(folder) == expected_modes(folder, 0o640, 0o750)


# --- paths that are not model folders ---------------------------------------------------------------------


def test_a_mistyped_folder_suggests_the_nearest_existing_one(run_folder, capsys):
    error = gptlab_error(capsys, ["generate", "--checkpoint", str(run_folder / "bset"), "--prompt", "the"])
    assert error == (
        f"gptlab generate: error: {run_folder / 'bset'} does not exist; did you mean {run_folder / 'best'}?\n"
    )

    mistyped_parent = run_folder.parent / "rnu" / "last"
    error = gptlab_error(capsys, ["info", "--checkpoint", str(mistyped_parent)])
    assert error == f"gptlab info: error: {mistyped_parent} does not exist; did you mean {run_folder / 'last'}?\n"

    error = gptlab_error(capsys, ["info", "--checkpoint", str(run_folder / "zzzzzz")])
    assert error == f"gptlab info: error: {run_folder / 'zzzzzz'} does not exist; check the path\n"


def test_a_run_folder_suggests_its_best_checkpoint_or_else_its_last(run_folder, tmp_path, capsys):
    error = gptlab_error(capsys, ["generate", "--checkpoint", str(run_folder), "--prompt", "the"])
    assert error == (
        f"gptlab generate: error: {run_folder} is a training run folder, not a checkpoint; "
        f"did you mean {run_folder / 'best'}?\n"
    )

    only_last = tmp_path / "interrupted"
    shutil.copytree(run_folder, only_last, ignore=shutil.ignore_patterns("best"))
    error = gptlab_error(capsys, ["convert", "--to-hf", str(only_last), str(tmp_path / "hf")])
    assert error.endswith(
        f"{only_last} is a training run folder, not a checkpoint; did you mean {only_last / 'last'}?\n"
    )
    assert not (tmp_path / "hf").exists()


def test_a_file_is_not_a_model_folder(run_folder, capsys):
    corpus = run_folder.parent / "corpus.txt"
    error = gptlab_error(capsys, ["info", "--checkpoint", str(corpus)])
    assert error.startswith(f"gptlab info: error: {corpus} is a file, not a folder; expected a gptlab checkpoint")
