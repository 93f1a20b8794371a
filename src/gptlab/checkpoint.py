"""Checkpoint folders: tensors in safetensors, everything else in JSON; nothing is unpickled on load.

A gptlab checkpoint folder holds
    config.json        {"format": "gptlab", "config": GPTConfig fields, "tokenizer": tokenizer spec}
    model.safetensors  the model's weights under gptlab's names (a tied head is stored once)
and, when written by training, the optimizer state (optimizer.safetensors) and trainer_state.json.
A classifier's config.json also has "classifier": {"labels": [...], "pooling": "last_token"}, and its
out_head.weight has one row per label instead of one per token (ClassifierHead); an instruction-tuned
model's has "chat_template": the name of the prompt template it was trained with.
Folders are written to a temporary sibling and renamed into place, so a crash mid-save leaves the
previous checkpoint as it was, and they end up with the modes the umask gives, like any other file.
Loading any folder gptlab understands (its own or Hugging Face's) is gptlab.loading's job.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import GPTConfig
from .errors import UserError
from .model import GPTModel
from .tokenizer import Tokenizer, tokenizer_from_spec

FORMAT = "gptlab"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CLASSIFIER_FIELD = "classifier"
CHAT_TEMPLATE_FIELD = "chat_template"
# How a classifier reads a text: the logits at its last token, the only one that attended to all of it under
# the causal mask. Batches are right-padded with the end-of-text id, which a text's own ids never hold
# (tokenizers encode "<|endoftext|>" in text as plain text), so the last token is the last non-padding one.
LAST_TOKEN = "last_token"
POOLINGS = (LAST_TOKEN,)


@dataclass(frozen=True)
class ClassifierHead:
    """What makes a checkpoint a classifier: an output head of one row per label, in class order, read at
    each text's last token (`pooling`)."""

    labels: tuple[str, ...]
    pooling: str = LAST_TOKEN

    def __post_init__(self) -> None:
        labels = self.labels
        if (
            not isinstance(labels, (list, tuple))
            or len(labels) < 2
            or len(set(labels)) != len(labels)
            or not all(isinstance(label, str) and label for label in labels)
        ):
            raise UserError(f"a classifier's labels must be two or more distinct non-empty strings, got {labels!r}")
        if self.pooling not in POOLINGS:
            raise UserError(f"unknown classifier pooling {self.pooling!r}; this gptlab reads {', '.join(POOLINGS)}")
        object.__setattr__(self, "labels", tuple(labels))

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "pooling": self.pooling}

    def describe(self) -> str:
        return f"a classifier (labels: {', '.join(self.labels)})"


def classifier_head(meta: dict) -> ClassifierHead | None:
    """The head a checkpoint's config.json describes, or None for a language model. Classifiers written
    before "classifier" existed list their labels alone ("labels"), read at the last token as now."""
    spec = meta.get(CLASSIFIER_FIELD)
    if spec is None and meta.get("labels"):
        spec = {"labels": meta["labels"]}
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) - {"labels", "pooling"} or "labels" not in spec:
        raise UserError(
            f'config.json\'s "{CLASSIFIER_FIELD}" must be {{"labels": [...], "pooling": '
            f'"{LAST_TOKEN}"}}, got {spec!r}; re-create the checkpoint'
        )
    return ClassifierHead(tuple(spec["labels"]), spec.get("pooling", LAST_TOKEN))


def give_classifier_head(model: GPTModel, n_classes: int) -> GPTModel:
    """Replace the output head by one of n_classes rows (nn.Linear's initialisation, as the textbook's), on
    the model's device; the model's config no longer ties it to the token embedding. Returns the model."""
    model.out_head = nn.Linear(model.cfg.emb_dim, n_classes, bias=False, device=model.device)
    model.cfg = model.cfg.replace(tie_embeddings=False)
    return model


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
        apply_umask(tmp)
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fsync_path(path.parent)  # the renames themselves
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        restore_interrupted_swap(path)
        raise


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir() and open() would have given them.

    mkdtemp makes its folder 0700, and safetensors (>= 0.8) writes each file as a 0600 temporary file that
    it renames into place, so without this weights would be private while config.json is not.
    """
    umask = os.umask(0o077)  # the only way to read the umask is to set it; restored on the next line
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def restore_interrupted_swap(path: Path) -> None:
    """Put back the previous folder that a swap interrupted between its renames left at `.NAME.old`. Safe
    when several processes (the ranks of one run) do it at once: the one that loses the race finds it done."""
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        try:
            os.replace(old, path)
        except FileNotFoundError:  # another process renamed it first
            pass


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folder itself, to the disk: renamed into place afterwards,
    a checkpoint is whole after a power cut, not a set of empty files."""
    for path in sorted(folder.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    if os.name == "nt" and path.is_dir():
        return  # Windows cannot open a folder to flush it; its renames are durable as they are
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_model_files(folder: Path, model: GPTModel, tokenizer: Tokenizer, extra: dict | None = None) -> None:
    """config.json and model.safetensors into an existing folder. `extra`: more config.json fields (a
    classifier's head, a chat template, a run's progress)."""
    meta = {"format": FORMAT, "config": model.cfg.to_dict(), "tokenizer": tokenizer.spec(), **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(model_tensors(model), str(folder / WEIGHTS_FILE))


def save_model(path: Path, model: GPTModel, tokenizer: Tokenizer, extra: dict | None = None) -> None:
    write_folder_atomically(Path(path), lambda folder: write_model_files(folder, model, tokenizer, extra))


def read_config(path: Path) -> tuple[GPTConfig, Tokenizer, dict]:
    meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    return GPTConfig.from_dict(meta["config"]), tokenizer_from_spec(meta["tokenizer"]), meta


def load_gptlab_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Tokenizer]:
    """The model (a classifier's with its head of one row per label) and tokenizer of a gptlab checkpoint."""
    cfg, tokenizer, meta = read_config(path)
    state = load_file(str(Path(path) / WEIGHTS_FILE), device=str(device))
    return model_from_state_dict(cfg, with_tied_head(cfg, state), classifier_head(meta)), tokenizer


def with_tied_head(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files store a tied head once, as tok_emb.weight; the module also lists it as out_head.weight."""
    if cfg.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    return state


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); re-create or re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; re-create or re-download it")
    return data


def model_from_state_dict(
    cfg: GPTConfig, state: dict[str, torch.Tensor], head: ClassifierHead | None = None
) -> GPTModel:
    """A GPTModel that holds the given tensors themselves, not copies: built on the meta device, then assigned.
    With `head`, a classifier: its out_head has one row per label."""
    if head is not None and cfg.tie_embeddings:
        raise UserError(
            "a classifier's head cannot be tied to the token embedding (tie_embeddings is true); "
            "re-create the checkpoint"
        )
    with torch.device("meta"):
        model = GPTModel(cfg)
        if head is not None:
            give_classifier_head(model, len(head.labels))
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.out_head.weight = model.tok_emb.weight
    return model.eval()
