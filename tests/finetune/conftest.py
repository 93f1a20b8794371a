"""What the fine-tuning tests share: a tiny random base model with a character vocabulary that covers every
template, a small model pretrained for a few seconds on a synthetic corpus, and record files."""

import json
import random
import string
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gptlab import train
from gptlab.checkpoint import save_model
from gptlab.config import GPTConfig
from gptlab.finetune.templates import TEMPLATES
from gptlab.model import GPTModel
from gptlab.tokenizer import CharTokenizer

# press_ctrl_c_after and friends live with the training tests
sys.path.insert(0, str(Path(__file__).parents[1] / "training"))

TEMPLATE_CHARS = {char for template in TEMPLATES.values() for text in vars(template).values() for char in text}
ALPHABET = "".join(sorted(TEMPLATE_CHARS | set(string.ascii_letters + string.digits + string.punctuation + " \n")))
TOKENIZER = CharTokenizer(ALPHABET)
LETTERS = "abcdefgh"


@contextmanager
def threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (the machine is shared), and one thread keeps float sums in
    the same order from run to run."""
    with threads(1):
        yield


def tiny_config(**changes) -> GPTConfig:
    settings = dict(
        vocab_size=TOKENIZER.vocab_size, context_length=256, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0
    )
    return GPTConfig(**{**settings, **changes})


def random_model(cfg: GPTConfig, seed: int = 0, noise: float = 0.05) -> GPTModel:
    """Every parameter random (biases and norms too), so that no misplaced term hides behind a zero."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random 2-layer model whose character vocabulary covers every template: a base for runs that test
    mechanics, not learning."""
    folder = tmp_path_factory.mktemp("tiny") / "base"
    save_model(folder, random_model(tiny_config()), TOKENIZER)
    return folder


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """A character model (2 layers, 64 dims in 4 heads, context 96) pretrained for 40 steps (a few seconds)
    on lines of random letters, after one ChatML conversation that brings the template's characters in."""
    folder = tmp_path_factory.mktemp("pretrained")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(LETTERS) for _ in range(12)) for _ in range(1500)]
    chat = "<|im_start|>user\nSort: b a<|im_end|>\n<|im_start|>assistant\nSorted: a b"
    (folder / "corpus.txt").write_text(chat + "\n" + "\n".join(lines))
    with threads(1):  # a session fixture starts before the autouse one_thread
        train(
            data=[str(folder / "corpus.txt")],
            out=str(folder / "run"),
            cache_dir=str(folder / "cache"),
            tokenizer="char",
            context_length=96,
            emb_dim=64,
            n_heads=4,
            n_layers=2,
            drop_rate=0.0,
            optimizer="adamw",
            max_steps=40,
            batch_size=16,
            lr=3e-3,
            warmup_steps=10,
            eval_interval=1000,
            sample_tokens=0,
            progress=False,
            device="cpu",
            log=lambda line: None,
        )
    return folder / "run" / "last"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
