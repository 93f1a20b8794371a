"""gptlab: a GPT-2-style language model built from scratch, and the tools to use one for real."""

from .checkpoint import load_model
from .config import PRESETS, GPTConfig, get_config
from .inference.generate import generate
from .model import GPTModel
from .tokenizer import CharTokenizer, load_tokenizer

__all__ = ["PRESETS", "GPTConfig", "GPTModel", "CharTokenizer", "generate", "get_config", "load_model", "load_tokenizer"]
