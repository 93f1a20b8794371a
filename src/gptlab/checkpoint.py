"""Checkpoint folders: tensors in safetensors, everything else in JSON; nothing is unpickled on load.

A gptlab checkpoint folder holds
    config.json        {"format": "gptlab", "config": GPTConfig fields, "tokenizer": tokenizer spec}
    model.safetensors  the model's weights under gptlab's names (a tied head is stored once)
and, when written by training, the optimizer state (optimizer.safetensors) and trainer_state.json.
Folders are written to a temporary sibling and renamed into place, so a crash mid-save leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .model import GPTModel
from .tokenizer import Tokenizer, tokenizer_from_spec

FORMAT = "gptlab"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_gptlab_checkpoint(path: Path) -> bool:
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def model_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights, contiguous, with a tied head left out (it is tok_emb.weight)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        del state["out_head.weight"]
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def write_folder_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_dir) to fill a fresh folder, then swap it in for `path` in two renames.

    Between the renames the previous folder lives at `.NAME.old`; if the process dies right there,
    `restore_interrupted_swap` (called here and before resuming) puts it back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(path)
    old = path.with_name(f".{path.name}.old")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        restore_interrupted_swap(path)
        raise


def restore_interrupted_swap(path: Path) -> None:
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)


def write_model_files(folder: Path, model: GPTModel, tokenizer: Tokenizer, extra: dict | None = None) -> None:
    """config.json and model.safetensors into an existing folder."""
    meta = {"format": FORMAT, "config": model.cfg.to_dict(), "tokenizer": tokenizer.spec(), **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(model_tensors(model), str(folder / WEIGHTS_FILE))


def save_model(path: Path, model: GPTModel, tokenizer: Tokenizer) -> None:
    write_folder_atomically(Path(path), lambda folder: write_model_files(folder, model, tokenizer))


def read_config(path: Path) -> tuple[GPTConfig, Tokenizer, dict]:
    meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    return GPTConfig.from_dict(meta["config"]), tokenizer_from_spec(meta["tokenizer"]), meta


def load_gptlab_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Tokenizer]:
    cfg, tokenizer, _ = read_config(path)
    state = load_file(str(Path(path) / WEIGHTS_FILE), device=str(device))
    return model_from_state_dict(cfg, with_tied_head(cfg, state)), tokenizer


def with_tied_head(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files store a tied head once, as tok_emb.weight; the module also lists it as out_head.weight."""
    if cfg.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    return state


# ---------------------------------------------------------------------------------------------------
# Loading any model folder gptlab understands: its own checkpoints and Hugging Face GPT-2 folders.

EXPECTED_LAYOUTS = (
    'a gptlab checkpoint (config.json with "format": "gptlab", model.safetensors) or a Hugging Face GPT-2 folder '
    '(config.json with "model_type": "gpt2", model.safetensors or pytorch_model.bin, optionally vocab.json + merges.txt)'
)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-create or re-download it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; re-create or re-download it")
    return data


def model_from_state_dict(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> GPTModel:
    """A GPTModel that holds the given tensors themselves, not copies: built on the meta device, then assigned."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.out_head.weight = model.tok_emb.weight
    return model.eval()


def checkpoint_format(path: Path) -> str:
    """'gptlab' or 'hf' for a folder load_model can read; else a ValueError saying what it should hold."""
    from .interop.hf import (
        hf_weight_files,  # interop imports this module, so it is imported on use
    )

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; expected {EXPECTED_LAYOUTS}")
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{folder} has no {CONFIG_FILE}; expected {EXPECTED_LAYOUTS}")
    meta = read_json(folder / CONFIG_FILE)
    if meta.get("format") == FORMAT:
        if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("tokenizer"), dict):
            raise ValueError(f"{folder / CONFIG_FILE} lacks the 'config' or 'tokenizer' object of a gptlab checkpoint")
        if not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(f"{folder} is a gptlab checkpoint without {WEIGHTS_FILE}; expected {EXPECTED_LAYOUTS}")
        return "gptlab"
    if meta.get("model_type") == "gpt2":
        if not hf_weight_files(folder):
            raise ValueError(f"{folder} has a GPT-2 {CONFIG_FILE} but no weights; expected {EXPECTED_LAYOUTS}")
        return "hf"
    raise ValueError(
        f"{folder / CONFIG_FILE} is neither gptlab's nor a GPT-2 one (format {meta.get('format')!r}, "
        f"model_type {meta.get('model_type')!r}); expected {EXPECTED_LAYOUTS}"
    )


def read_model_config(path: Path) -> tuple[GPTConfig, str]:
    """The shape of the model in a loadable folder and the folder's format, from config.json alone."""
    from .interop.hf import (  # interop imports this module
        check_hf_config,
        config_from_hf,
    )

    kind = checkpoint_format(path)
    meta = read_json(Path(path) / CONFIG_FILE)
    if kind == "gptlab":
        return GPTConfig.from_dict(meta["config"]), kind
    check_hf_config(meta)
    return config_from_hf(meta), kind


def load_model(
    path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPTModel, Tokenizer]:
    """The model and tokenizer in a gptlab checkpoint or a Hugging Face GPT-2 folder (any of the four
    sizes), memory-mapped rather than copied where the device and dtype allow. Bad folders, missing
    weights and shape mismatches raise a one-line ValueError."""
    from .interop.hf import load_hf_checkpoint  # interop imports this module

    try:
        if checkpoint_format(path) == "hf":
            return load_hf_checkpoint(path, device, dtype)
        model, tokenizer = load_gptlab_checkpoint(path, device)
    except SafetensorError as error:
        raise ValueError(f"a weights file in {path} is damaged or not safetensors ({error}); re-create it") from None
    return (model if dtype is None else model.to(dtype)), tokenizer
