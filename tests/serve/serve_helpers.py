"""What the server tests share: a tiny random GPT-2-shaped checkpoint, and reading JSON from a URL."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import torch

from gptlab.checkpoint import save_model
from gptlab.config import GPTConfig
from gptlab.model import GPTModel
from gptlab.tokenizer import load_tokenizer

TINY = GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_heads=2, n_layers=2)
API_KEY = "test-key-123"


def noisy_model(cfg: GPTConfig) -> GPTModel:
    """A model whose weights are all random (biases and norms too, so no term hides behind a zero)."""
    torch.manual_seed(0)
    model = GPTModel(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def tiny_checkpoint(path: Path, chat_template: str | None = None) -> Path:
    """The tiny noisy model saved to path, with a chat template named in its config if one is given."""
    save_model(path, noisy_model(TINY), load_tokenizer())
    if chat_template is not None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return path


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_until_idle(url: str, timeout: float = 10) -> dict:
    """Poll /health until no request decodes or waits; its last answer."""
    deadline = time.time() + timeout
    while True:
        _, health = get_json(url + "/health")
        if (health["requests_decoding"], health["requests_waiting"]) == (0, 0) or time.time() > deadline:
            return health
        time.sleep(0.05)
