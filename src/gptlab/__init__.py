"""gptlab: a GPT-2-style language model built from scratch, and the tools to use one for real."""

from .config import PRESETS, GPTConfig, get_config
from .inference.generate import generate
from .loading import load_model
from .model import GPTModel
from .tokenizer import CharTokenizer, load_tokenizer
from .training.pipeline import evaluate, train

__all__ = ["PRESETS", "GPTConfig", "GPTModel", "CharTokenizer", "evaluate", "generate", "get_config", "load_model",
           "load_tokenizer", "train"]
