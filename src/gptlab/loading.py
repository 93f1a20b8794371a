"""Loading any model folder gptlab understands: its own checkpoints and Hugging Face GPT-2 folders, each
either a language model (load_model) or a classifier (load_classifier).

It reads both formats (checkpoint.py and hf_format.py), both in the core layer.
A path that is not such a folder gets a one-line ValueError saying what it is and what to pass instead,
and so does a classifier where a language model is needed (check_language_model): its head scores labels,
so generating, serving or evaluating it as a language model would read label scores as token logits.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .checkpoint import (
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_FILE,
    ClassifierHead,
    classifier_head,
    is_gptlab_checkpoint,
    load_gptlab_checkpoint,
    read_config,
    read_json,
)
from .config import GPTConfig
from .errors import UserError
from .hf_format import (
    check_hf_config,
    classifier_head_from_hf,
    config_from_hf,
    hf_weight_files,
    load_hf_checkpoint,
    load_hf_tokenizer,
)
from .model import GPTModel
from .tokenizer import Tokenizer

EXPECTED_LAYOUTS = (
    'a gptlab checkpoint (config.json with "format": "gptlab", model.safetensors) or a Hugging Face GPT-2 folder '
    '(config.json with "model_type": "gpt2", model.safetensors or pytorch_model.bin, '
    "optionally vocab.json + merges.txt)"
)
# The checkpoints a training run folder holds, in the order they are worth suggesting.
RUN_CHECKPOINTS = ("best", "last")


def missing_path_message(path: Path) -> str:
    """`path` does not exist: say so, and suggest the existing folder whose name is closest to the first
    missing part of it (runs/mine/bset -> runs/mine/best, runs/mien/best -> runs/mine/best)."""
    missing = next(part for part in [*reversed(path.parents), path] if not part.exists())
    closest = difflib.get_close_matches(missing.name, sibling_folders(missing), n=1)
    if closest:
        return f"{path} does not exist; did you mean {missing.parent / closest[0] / path.relative_to(missing)}?"
    if missing == path:
        return f"{path} does not exist; check the path"
    return f"{path} does not exist (there is no {missing}); check the path"


def sibling_folders(path: Path) -> list[str]:
    """The names of the folders next to `path`; hidden ones (temporary copies) only when `path` is hidden too."""
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # an unreadable parent: no suggestion rather than a traceback
        return []
    hidden_ok = path.name.startswith(".")
    return [entry.name for entry in entries if entry.is_dir() and (hidden_ok or not entry.name.startswith("."))]


def run_folder_checkpoint(folder: Path) -> Path | None:
    """The checkpoint to suggest when `folder` is a training run folder (it holds best/ or last/), else None."""
    return next((folder / name for name in RUN_CHECKPOINTS if is_gptlab_checkpoint(folder / name)), None)


def checkpoint_format(path: Path) -> str:
    """'gptlab' or 'hf' for a folder load_model can read; else a ValueError saying what it should hold."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(missing_path_message(folder))
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; expected {EXPECTED_LAYOUTS}")
    if not (folder / CONFIG_FILE).is_file():
        checkpoint = run_folder_checkpoint(folder)
        if checkpoint is not None:
            raise UserError(f"{folder} is a training run folder, not a checkpoint; did you mean {checkpoint}?")
        raise UserError(f"{folder} has no {CONFIG_FILE}; expected {EXPECTED_LAYOUTS}")
    meta = read_json(folder / CONFIG_FILE)
    if meta.get("format") == FORMAT:
        if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("tokenizer"), dict):
            raise UserError(f"{folder / CONFIG_FILE} lacks the 'config' or 'tokenizer' object of a gptlab checkpoint")
        if not (folder / WEIGHTS_FILE).is_file():
            raise UserError(f"{folder} is a gptlab checkpoint without {WEIGHTS_FILE}; expected {EXPECTED_LAYOUTS}")
        return "gptlab"
    if meta.get("model_type") == "gpt2":
        if not hf_weight_files(folder):
            raise UserError(f"{folder} has a GPT-2 {CONFIG_FILE} but no weights; expected {EXPECTED_LAYOUTS}")
        return "hf"
    raise UserError(
        f"{folder / CONFIG_FILE} is neither gptlab's nor a GPT-2 one (format {meta.get('format')!r}, "
        f"model_type {meta.get('model_type')!r}); expected {EXPECTED_LAYOUTS}"
    )


def read_model_config(path: Path) -> tuple[GPTConfig, str]:
    """The shape of the model in a loadable folder and the folder's format, from config.json alone."""
    kind = checkpoint_format(path)
    meta = read_json(Path(path) / CONFIG_FILE)
    if kind == "gptlab":
        return GPTConfig.from_dict(meta["config"]), kind
    check_hf_config(meta)
    return config_from_hf(meta), kind


def read_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a loadable folder, without its weights."""
    meta = read_json(Path(path) / CONFIG_FILE)
    return read_config(path)[1] if checkpoint_format(path) == "gptlab" else load_hf_tokenizer(Path(path), meta)


def read_classifier_head(path: Path) -> ClassifierHead | None:
    """The classifier head of a loadable folder (gptlab's "classifier", or a GPT2ForSequenceClassification
    export's labels), or None for a language model; from config.json alone."""
    kind = checkpoint_format(path)
    meta = read_json(Path(path) / CONFIG_FILE)
    return classifier_head(meta) if kind == "gptlab" else classifier_head_from_hf(meta)


def not_a_language_model(path: Path, head: ClassifierHead) -> str:
    return (
        f"{path} is {head.describe()}: its head scores labels, not next tokens, so it cannot generate text, be "
        f"served or be scored as a language model; label texts with `gptlab classify --checkpoint {path}`, or "
        f"export it with `gptlab convert --to-hf {path} DIR` (transformers' GPT2ForSequenceClassification)"
    )


def check_language_model(path: Path) -> None:
    """A one-line ValueError if `path` is not a loadable language model: a bad folder says what it is, and a
    classifier what to use instead. Reads config.json only, so commands can check before they start."""
    head = read_classifier_head(path)
    if head is not None:
        raise UserError(not_a_language_model(path, head))


def load_model(
    path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPTModel, Tokenizer]:
    """The language model and tokenizer in a gptlab checkpoint or a Hugging Face GPT-2 folder (any of the
    four sizes), memory-mapped rather than copied where the device and dtype allow. Bad folders, missing
    weights and shape mismatches raise a one-line ValueError, and so does a classifier (load_classifier
    reads it)."""
    check_language_model(path)
    return load_weights(path, device, dtype)[:2]


@dataclass(frozen=True)
class Classifier:
    """A classifier checkpoint's model (out_head: one row per label), tokenizer and head."""

    model: GPTModel
    tokenizer: Tokenizer
    head: ClassifierHead

    @property
    def labels(self) -> list[str]:
        return list(self.head.labels)


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Classifier:
    """The classifier in a gptlab checkpoint (`gptlab finetune classify`) or in its Hugging Face export."""
    path = Path(path)
    if read_classifier_head(path) is None:
        raise UserError(
            f"{path} is a language model, not a classifier (its config.json lists no labels); "
            "fine-tune one with `gptlab finetune classify`"
        )
    return Classifier(*load_weights(path, device, dtype))


def load_weights(
    path: Path, device: str | torch.device, dtype: torch.dtype | None
) -> tuple[GPTModel, Tokenizer, ClassifierHead | None]:
    """Whatever model the folder holds, its tokenizer, and its classifier head (None: a language model)."""
    try:
        if checkpoint_format(path) == "hf":
            model, tokenizer = load_hf_checkpoint(path, device, dtype)
        else:
            model, tokenizer = load_gptlab_checkpoint(path, device)
    except SafetensorError as error:
        raise UserError(f"a weights file in {path} is damaged or not safetensors ({error}); re-create it") from None
    return (model if dtype is None else model.to(dtype)), tokenizer, read_classifier_head(path)
