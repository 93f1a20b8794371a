"""A run's checkpoints and folder: what `last/` and `best/` hold, how they are written and read back.

A training checkpoint is a model checkpoint (config.json + model.safetensors, loadable by
gptlab.load_model) plus
    optimizer.safetensors  the optimizer's state per parameter, under the parameter's name ('tok_emb.weight.exp_avg',
                           'trf_blocks.0.ff.fc.weight.momentum_buffer' for Muon)
    rng.safetensors        each rank's random state ('cpu.0', 'cuda.0', ...)
    trainer_state.json     step, tokens seen, position in the epoch order, time spent, best validation loss,
                           the dropout multiple in force
    run.toml               the run's settings (training/config.py), which `--resume` continues with
    training_weights.safetensors  with --ema-decay only: the weights the optimizer moves, while the model
                           files hold their average (training/averaging.py)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import (
    is_gptlab_checkpoint,
    restore_interrupted_swap,
    with_tied_head,
    write_folder_atomically,
    write_model_files,
)
from ..model import GPTModel
from ..tokenizer import Tokenizer
from .config import RUN_FILE, RunConfig, read_toml, resolve
from .fsdp import is_sharded, load_sharded, save_sharded
from .runtime import TrainingError

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
RUN_MARKER = "gptlab-run.json"


@dataclass
class TrainerState:
    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    windows_in_epoch: int = 0  # windows of this epoch's order already consumed
    elapsed: float = 0.0  # training seconds before this process started
    best_val_loss: float | None = None
    dropout_scale: float | None = None  # the multiple of the model's dropout rates in force (training/dropout.py)
    rng_states: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False)  # one per rank


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]
) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state under the parameter's name, e.g. 'tok_emb.weight.exp_avg'."""
    tensors = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"{names[param]}.{key}"] = value.detach().reshape(value.shape).contiguous().cpu()
    return tensors


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str], tensors: dict[str, torch.Tensor]
) -> None:
    """Restore through optimizer.load_state_dict, which puts each tensor where the optimizer wants it (a
    fused AdamW on a GPU keeps its `step` counters on the GPU, a CPU one on the CPU)."""
    document = optimizer.state_dict()
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state = {}
    for index, param in enumerate(params):
        prefix = f"{names[param]}."
        entries = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        entries = {key: value for key, value in entries.items() if "." not in key}  # not a longer name's
        if entries:
            state[index] = entries
    optimizer.load_state_dict({"state": state, "param_groups": document["param_groups"]})


class FilesBeside(Protocol):
    """What writes files of its own into a checkpoint folder: the weight average (averaging.py)."""

    def save(self, folder: Path) -> None: ...


def save_checkpoint(
    path: Path,
    model: GPTModel,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    run: RunConfig | None = None,
    write_model=write_model_files,
    full_model: GPTModel | None = None,
    average: FilesBeside | None = None,
) -> None:
    """`write_model(folder, model, tokenizer, extra)` writes the model's own files (config.json and
    model.safetensors by default; fine-tuning may write adapters instead). With `average` in the model,
    they hold the average and the training weights go beside them.

    With `full_model` (an --fsdp run: `model` is sharded, full_model its unsharded copy on rank 0, None on
    the others), every rank calls this: the weights and AdamW state go to shards/ through
    torch.distributed.checkpoint, and rank 0 adds the full model's files, so `last/` still loads with
    gptlab.load_model."""

    def write_rest(folder: Path, weights: GPTModel) -> None:
        write_model(folder, weights, tokenizer, extra={"step": state.step, "tokens_seen": state.tokens_seen})
        save_file(
            {
                f"{kind}.{rank}": tensor.cpu()
                for rank, states in enumerate(state.rng_states)
                for kind, tensor in states.items()
            },
            str(folder / RNG_FILE),
        )
        fields = {k: v for k, v in dataclasses.asdict(state).items() if k != "rng_states"}
        (folder / STATE_FILE).write_text(json.dumps({"trainer": fields}, indent=2) + "\n")
        if run is not None:
            (folder / RUN_FILE).write_text(run.to_toml())
        if average is not None:
            average.save(folder)

    if is_sharded(model):
        save_sharded(path, model, optimizer, write_main=lambda folder: write_rest(folder, full_model))
        return
    names = {param: name for name, param in model.named_parameters()}

    def write(folder: Path) -> None:
        write_rest(folder, model)
        save_file(optimizer_tensors(optimizer, names), str(folder / OPTIMIZER_FILE))

    write_folder_atomically(path, write)


def load_model_weights(path: Path, model: GPTModel) -> None:
    model.load_state_dict(with_tied_head(model.cfg, load_file(str(path / "model.safetensors"))))


def load_trainer_state(
    path: Path, model: GPTModel, optimizer: torch.optim.Optimizer, read_model=load_model_weights
) -> TrainerState:
    """`read_model(folder, model)` puts the checkpoint's weights into the model (fine-tuning may read adapters)."""
    if is_sharded(model):  # weights and AdamW state from shards/, whatever the number of processes
        load_sharded(path, model, optimizer)
    else:
        if not (path / OPTIMIZER_FILE).is_file():
            raise TrainingError(
                f"{path} was written by an --fsdp run (its optimizer state is in shards/); "
                "resume it with --fsdp under torchrun"
            )
        names = {param: name for name, param in model.named_parameters()}
        read_model(path, model)
        load_optimizer_tensors(optimizer, names, load_file(str(path / OPTIMIZER_FILE)))
    rngs = load_file(str(path / RNG_FILE))
    ranks = sorted({int(key.split(".")[1]) for key in rngs})
    states = [{key.split(".")[0]: value for key, value in rngs.items() if key.endswith(f".{rank}")} for rank in ranks]
    fields = json.loads((path / STATE_FILE).read_text())["trainer"]
    return TrainerState(**fields, rng_states=states)


def link_or_copy_folder(source: Path, target: Path) -> None:
    """`best` from `last` without reading the files into memory: hard links where the file system has them
    (a checkpoint's files are never rewritten in place, only replaced, so the links stay valid), else a copy."""
    for item in source.iterdir():
        if item.is_dir():  # an --fsdp checkpoint's shards/
            (target / item.name).mkdir()
            link_or_copy_folder(item, target / item.name)
            continue
        try:
            os.link(item, target / item.name)
        except OSError:
            shutil.copyfile(item, target / item.name)


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a folder holding files that are not a gptlab run, and never clobber a run
    unless asked. Creates nothing: the folder is made once every other check has passed."""
    if resume and overwrite:
        raise TrainingError("--resume continues a run and --overwrite replaces it; give one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"output path {out_dir} is a file, not a folder; choose another --out")
    entries = [p.name for p in out_dir.iterdir()] if out_dir.is_dir() else []
    ours = RUN_MARKER in entries
    if entries and not ours:
        raise TrainingError(
            f"output folder {out_dir} holds files that are not a gptlab run ({', '.join(sorted(entries)[:3])}...); "
            "choose an empty or new --out"
        )
    if resume:
        restore_interrupted_swap(out_dir / "last")
    if resume and not is_gptlab_checkpoint(out_dir / "last"):
        raise TrainingError(
            f"--resume: no checkpoint at {out_dir / 'last'}; start without --resume or point --out at a run"
        )
    if ours and not resume and not overwrite:
        raise TrainingError(
            f"output folder {out_dir} already holds a gptlab run; continue it with --resume, "
            "replace it with --overwrite, or choose another --out"
        )
    parent = next((p for p in [out_dir, *out_dir.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise TrainingError(
            f"cannot write to output folder {out_dir}: {parent} is not writable; choose a writable --out"
        )


def make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TrainingError(
            f"cannot write to output folder {out_dir}: {error.strerror}; choose a writable --out"
        ) from None


def read_run_config(checkpoint: Path) -> RunConfig | None:
    """The settings of the run that wrote this checkpoint, or None for a checkpoint made otherwise."""
    path = Path(checkpoint) / RUN_FILE
    return resolve(read_toml(path)) if path.is_file() else None  # resolve: a fine-tune's unset stride stays unset


def read_log(path: Path) -> tuple[list[dict], bool]:
    """The records of a JSON-lines log (metrics.jsonl, samples.jsonl), and whether its last line was torn
    (a crash mid-write), which is left out. A bad line before the last is damage: a TrainingError."""
    if not path.exists():
        return [], False
    lines = path.read_text().split("\n")  # the last item is "" when the file ends with its newline
    records = []
    for index, line in enumerate(lines):
        try:
            if line:
                records.append(json.loads(line))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise TrainingError(
                    f"{path}, line {index + 1}, is not JSON; repair or remove that line, then resume"
                ) from None
            return records, True
    return records, False


def write_log(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
