"""The README's command examples run as written: every `gptlab ...` line of its plain code blocks, in the
order the README gives them, in a fresh folder holding what a reader would have (some text in notes/ and
books/, GPT-2-shaped weights in models/gpt2, the recipes). Each must exit 0.

A few cannot run on a test machine, and are left out for the reason given in NOT_HERE. The GPT-2 weights
are a tiny random model with GPT-2's real vocabulary, so the examples that load OpenAI's GPT-2 run too.
"""

import io
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.data import default_corpus_text

ROOT = Path(__file__).resolve().parents[1]
NOT_HERE = {
    "gptlab download": "needs the network",
    "recipes/gpt2-124m.toml": "GPT-2 124M on 10B tokens needs GPUs",
    "--device cuda": "needs a GPU",
    "gptlab serve": "serves until stopped; tests/serve starts it, with the same client code",
}


def readme_commands() -> list[str]:
    commands, fence = [], None  # fence: the open code block's language ("" for a plain block), None outside
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        command = re.split(r"\s{2,}#", line)[0].strip()
        if fence != "" or not command.startswith("gptlab ") or " [" in command:  # `[--opt ...]`: a synopsis
            continue
        if not any(marker in command for marker in NOT_HERE):
            commands.append(command)
    return commands


@pytest.fixture
def reader_folder(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    text = default_corpus_text()
    (tmp_path / "notes").mkdir()
    (tmp_path / "books").mkdir()
    for i in range(3):  # enough for the held-out 10% to fill a window of the default model's 128 characters
        (tmp_path / "notes" / f"note-{i}.md").write_text(text[i * 4_000:(i + 1) * 4_000])
    (tmp_path / "books" / "book.txt").write_text(text[40_000:44_000])
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_head=2, n_layer=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "models" / "gpt2")
    from gptlab.interop.hf_tokenizer import write_tokenizer_files
    from gptlab.tokenizer import load_tokenizer

    write_tokenizer_files(tmp_path / "models" / "gpt2", load_tokenizer("gpt2"), context_length=64)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello, I am\n"))  # for --interactive
    return tmp_path


def test_the_readme_names_the_commands_this_test_runs():
    commands = readme_commands()
    assert any(c.startswith("gptlab train --data") for c in commands)
    assert any(c.startswith("gptlab eval") for c in commands) and any(c.startswith("gptlab generate") for c in commands)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(reader_folder, capsys):
    for command in readme_commands():
        started = time.perf_counter()
        code = main(shlex.split(command)[1:])
        print(f"{time.perf_counter() - started:6.1f} s  {command}", file=sys.__stderr__)
        captured = capsys.readouterr()
        assert code == 0, f"{command!r} exited {code}: {captured.err[-2000:]}"
