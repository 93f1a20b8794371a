"""The README's and the docs' examples run as written: every `gptlab ...` line of their plain code blocks and
every ```python block, in the order the pages give them (README.md first, then DOC_PAGES), in one fresh folder
holding what a reader would have (some text in notes/ and books/, GPT-2-shaped weights in models/gpt2, the
recipes). Each command must exit 0 and each Python block must run without an exception.

A few cannot run on a test machine, and are left out for the reason given in NOT_HERE. The GPT-2 weights
are a tiny random model with GPT-2's real vocabulary, so the examples that load OpenAI's GPT-2 run too.
"""

import io
import json
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
DOC_PAGES = [
    "README.md",
    "docs/training.md",
    "docs/generation.md",
    "docs/finetuning.md",
    "docs/serving.md",
    "docs/interop.md",
    "docs/pretraining.md",
]
NOT_HERE = {
    "gptlab download": "needs the network",
    "recipes/gpt2-124m.toml": "GPT-2 124M on 10B tokens needs GPUs",
    "--device cuda": "needs a GPU",
    "gptlab serve": "serves until stopped; tests/serve starts it, with the same client code",
    "OpenAI(": "talks to a running `gptlab serve`; tests/serve runs the same client code against one",
}


def examples(page: str) -> list[tuple[str, str]]:
    """The page's runnable examples in order: ("command", a `gptlab ...` line) from plain code blocks and
    ("python", a block's source) from ```python blocks, less those NOT_HERE names."""
    found, fence, block = [], None, []  # fence: the open code block's language ("" for a plain block), None outside
    for line in (ROOT / page).read_text().splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, block = line[3:].strip(), []
            else:
                if fence == "python":
                    found.append(("python", "\n".join(block)))
                fence = None
            continue
        if fence == "python":
            block.append(line)
        command = re.split(r"\s{2,}#", line)[0].strip()
        if fence == "" and command.startswith("gptlab ") and " [" not in command:  # `[--opt ...]`: a synopsis
            found.append(("command", command))
    return [(kind, text) for kind, text in found if not any(marker in text for marker in NOT_HERE)]


def readme_commands() -> list[str]:
    return [text for page in DOC_PAGES for kind, text in examples(page) if kind == "command"]


@pytest.fixture
def reader_folder(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    text = default_corpus_text()
    (tmp_path / "notes").mkdir()
    (tmp_path / "books").mkdir()
    for i in range(3):  # enough for the held-out 10% to fill a window of the default model's 128 characters
        (tmp_path / "notes" / f"note-{i}.md").write_text(text[i * 4_000 : (i + 1) * 4_000])
    (tmp_path / "books" / "book.txt").write_text(text[40_000:44_000])
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_head=2, n_layer=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "models" / "gpt2")
    from gptlab.interop.hf_tokenizer import write_tokenizer_files
    from gptlab.tokenizer import load_tokenizer

    write_tokenizer_files(tmp_path / "models" / "gpt2", load_tokenizer("gpt2"), context_length=64)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    hellaswag = [  # two items of hellaswag_val.jsonl, as published
        {
            "ind": 7,
            "activity_label": "Making a sandwich",
            "ctx_a": "A woman puts two slices of bread on a plate.",
            "ctx_b": "she",
            "endings": [
                "spreads butter on one slice.",
                "throws the plate at the wall.",
                "paints the bread green.",
                "reads the bread a story.",
            ],
            "label": 0,
        },
        {
            "ind": 106,
            "activity_label": "Home and Garden",
            "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
            "ctx_b": "",
            "endings": [
                "[step] Tomatoes need at least six hours of sun a day.",
                "[step] Bury the car keys.",
                "[title] Paint the fence blue.",
                "[step] Sing to the seeds at night.",
            ],
            "label": 0,
        },
    ]
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps(item) + "\n" for item in hellaswag))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello, I am\n"))  # for --interactive
    return tmp_path


def test_the_pages_name_the_examples_this_test_runs():
    commands = readme_commands()
    assert any(c.startswith("gptlab train --data") for c in commands)
    assert any(c.startswith("gptlab eval") for c in commands) and any(c.startswith("gptlab generate") for c in commands)
    assert all(any(kind == "python" for kind, _ in examples(page)) for page in ("README.md", "docs/generation.md"))


@pytest.mark.slow
def test_every_example_runs_as_written(reader_folder, capsys):
    for page in DOC_PAGES:
        for kind, text in examples(page):
            started = time.perf_counter()
            if kind == "command":
                code = main(shlex.split(text)[1:])
                captured = capsys.readouterr()
                assert code == 0, f"{page}: {text!r} exited {code}: {captured.err[-2000:]}"
            else:
                exec(compile(text, f"{page} (python block)", "exec"), {"__name__": "__main__"})
                capsys.readouterr()
            print(f"{time.perf_counter() - started:6.1f} s  {page}: {text.splitlines()[0]}", file=sys.__stderr__)
