"""gptlab: a GPT-2-style language model built from scratch, and the tools to use one for real.

The public names load on first use (PEP 562), so `import gptlab`, and any `gptlab.<module>` import,
costs only what that module needs: tests/test_startup.py checks it.
"""

from __future__ import annotations

import importlib

# public name → the module that defines it
PUBLIC = {
    "PRESETS": "gptlab.config",
    "GPTConfig": "gptlab.config",
    "get_config": "gptlab.config",
    "GPTModel": "gptlab.model",
    "CharTokenizer": "gptlab.tokenizer",
    "load_tokenizer": "gptlab.tokenizer",
    "load_model": "gptlab.loading",
    "generate": "gptlab.inference.generate",
    "evaluate": "gptlab.training.pipeline",
    "train": "gptlab.finetune.pipeline",  # training's run with fine-tuning's hooks (LoRA)
}
__all__ = sorted(PUBLIC)


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(PUBLIC[name]), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC))
