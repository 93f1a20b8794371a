"""Fully sharded data parallel training (FSDP2) under `torchrun`: sharding, activation checkpointing and
sharded checkpoints.

Each TransformerBlock and then the whole GPTModel are wrapped by `fully_shard`: every rank keeps 1/world
of each parameter, gradient and AdamW moment, and a block's full weights exist only while that block
runs. The training step is the one DDP uses (loss, backward, clip_grad_norm_, optimizer.step); FSDP
averages the gradients across ranks during backward.

Sharded checkpoints go through torch.distributed.checkpoint (DCP), but not in its default format: that
one stores its metadata with pickle, and gptlab never unpickles a checkpoint. DCP's Hugging Face storage
instead writes each rank's shards as a safetensors file whose JSON header records where every shard
sits in the full tensor, and reads the layout back from those headers. So a checkpoint folder holds
    shards/shard-0000R-model-00001-of-00001.safetensors   rank R's slices of the weights and AdamW state
    sharded_state.json                                    the caller's `extra` (step, data position, ...)
and can be loaded by any number of processes: DCP reshards on load.

torch's FSDP and DCP modules load on first use, in the functions below, so that what never shards (a
run in one process, `gptlab --help`) does not pay for importing them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import model_from_state_dict, write_folder_atomically
from ..errors import UserError
from ..model import GPTModel
from ..torch_compat import checkpoint_wrapper

SHARDS_DIR = "shards"
EXTRA_FILE = "sharded_state.json"
MIXED_PRECISION = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# DCP keys of the two halves of a checkpoint; names inside follow the model's own, e.g.
# "model.tok_emb.weight" and "optimizer.tok_emb.weight.exp_avg".
MODEL_PREFIX, OPTIMIZER_PREFIX = "model.", "optimizer."


def shard_model(
    model: GPTModel, activation_checkpointing: bool = False, mixed_precision: str | None = None
) -> GPTModel:
    """Shard `model` in place across the default process group (call after init_process_group, with the
    model already on this rank's device) and return it; build the optimizer afterwards, from the
    sharded parameters.

    activation_checkpointing: keep only each block's input during the forward pass and recompute the
    rest in backward (about a third more compute for a fraction of the activation memory). The
    recomputation restores the RNG state first, so even dropout gives the same losses.
    mixed_precision: "bfloat16" computes with bf16 copies of the weights and reduces gradients in fp32;
    None or "float32" keeps everything in fp32 (bf16 autocast still applies on top, if the caller uses it).
    """
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        raise UserError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)} or None, got {mixed_precision!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mixed_precision is not None:
        policy = MixedPrecisionPolicy(param_dtype=MIXED_PRECISION[mixed_precision], reduce_dtype=torch.float32)
    # One mesh dimension over every process, on the device the model is on: left to itself, fully_shard
    # would pick CUDA whenever the machine has it, even for a CPU run under gloo.
    mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))
    if activation_checkpointing:
        checkpoint_blocks(model)
    for block in model.trf_blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root holds what is left: both embeddings, the final norm and the (possibly tied) output head.
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def checkpoint_blocks(model: GPTModel) -> GPTModel:
    """Activation checkpointing, with or without FSDP: each block keeps only its input during the forward
    pass and recomputes the rest in backward (about a third more compute for a fraction of the activation
    memory). The wrapper strips its own name from parameter and state-dict names, so checkpoints of runs
    with and without it are interchangeable."""
    for index, block in enumerate(model.trf_blocks):
        model.trf_blocks[index] = checkpoint_wrapper(block)  # torch_compat: a private torch module
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    if "torch.distributed.fsdp" not in sys.modules:  # nothing was sharded: FSDP was never imported
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The unsharded weights as CPU tensors, on rank 0; an empty dict on the other ranks. Every rank must
    call it (each contributes its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def unsharded_copy(model: GPTModel) -> GPTModel | None:
    """A plain CPU GPTModel holding the full weights, on rank 0 (None elsewhere): what
    checkpoint.write_model_files and sampling take. Every rank must call it."""
    state = full_state_dict(model)
    if not state:
        return None
    return model_from_state_dict(model.cfg, state)


def sharded_tensors(model: GPTModel, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """The model and optimizer state dicts of this rank (DTensor shards) and one flat dict of every
    tensor in them under DCP keys. The optimizer's hyperparameters (param_groups) are left out: they
    are not tensors, and the trainer sets them from its own config."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    tied = {"out_head.weight"} if model.cfg.tie_embeddings else set()  # stored once, as tok_emb.weight
    tensors = {MODEL_PREFIX + name: tensor for name, tensor in model_state.items() if name not in tied}
    for name, param_state in optimizer_state["state"].items():
        for key, value in param_state.items():
            tensors[f"{OPTIMIZER_PREFIX}{name}.{key}"] = value
    return model_state, optimizer_state, tensors


def save_sharded(
    path: Path,
    model: GPTModel,
    optimizer: torch.optim.Optimizer,
    extra: dict | None = None,
    write_main: Callable[[Path], None] | None = None,
) -> None:
    """Write a sharded checkpoint folder at `path`, replacing any there, atomically: rank 0's temporary
    folder is filled by every rank and renamed into place only if all of them succeeded. Every rank must
    call it.

    extra: JSON data saved with it (step, epoch, ...), returned by load_sharded.
    write_main: called on rank 0 with the temporary folder, to add files of its own (config.json,
    model.safetensors from unsharded_copy, ...) to the same atomic write.
    """
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()

    def write(main_folder: Path | None) -> None:
        folder = Path(broadcast_from_main(str(main_folder) if rank == 0 else None))
        # Every rank learns whether all wrote their part, so that rank 0 commits or discards the folder.
        try:
            _, _, tensors = sharded_tensors(model, optimizer)
            writer = dcp.HuggingFaceStorageWriter(str(folder / SHARDS_DIR), save_distributed=True)
            dcp.save(tensors, storage_writer=writer)
            if rank == 0:
                (folder / EXTRA_FILE).write_text(json.dumps(extra or {}, indent=2) + "\n")
                if write_main is not None:
                    write_main(folder)
        except BaseException:
            any_rank(True)
            raise
        if any_rank(False):
            raise RuntimeError(f"another rank failed while saving the sharded checkpoint {path}; see its log")

    if rank == 0:
        write_folder_atomically(Path(path), write)
    else:
        write(None)
    dist.barrier()  # the folder is in place before any rank goes on (and perhaps reads it)


def load_sharded(path: Path, model: GPTModel, optimizer: torch.optim.Optimizer) -> dict:
    """Load a folder written by save_sharded into the sharded `model` and `optimizer` (built as for the
    original run; the number of processes may differ) and return its `extra`. Every rank must call it."""
    path = Path(path)
    shards = path / SHARDS_DIR
    if not (path / EXTRA_FILE).is_file() or not any(shards.glob("*.safetensors")):
        raise UserError(
            f"{path} is not a sharded checkpoint (it needs {SHARDS_DIR}/*.safetensors and {EXTRA_FILE}); "
            "resume an --fsdp run from the folder it wrote"
        )
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    # get_state_dict gives a fresh optimizer zeroed moments (a step at lr 0), for dcp.load to fill in place.
    model_state, optimizer_state, tensors = sharded_tensors(model, optimizer)
    reader = dcp.HuggingFaceStorageReader(str(shards))
    check_layout(path, {name: meta.size for name, meta in reader.read_metadata().state_dict_metadata.items()}, tensors)
    dcp.load(tensors, storage_reader=reader)
    # dcp.load wrote into this rank's shards in place; set_state_dict also re-links the optimizer state
    # to the parameters and keeps the current param_groups (learning rate and the rest come from the trainer).
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    return json.loads((path / EXTRA_FILE).read_text())


def check_layout(path: Path, saved: dict[str, torch.Size], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose tensors are not exactly this model's and optimizer's (DCP would load a
    subset without complaint, e.g. a model with fewer layers)."""
    missing = sorted(tensors.keys() - saved.keys())
    unexpected = sorted(saved.keys() - tensors.keys())
    common = tensors.keys() & saved.keys()
    reshaped = sorted(name for name in common if tuple(saved[name]) != tuple(tensors[name].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (first {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} not in this model (first {unexpected[0]})")
    if reshaped:
        name = reshaped[0]
        problems.append(
            f"{len(reshaped)} of another shape (first {name}: {tuple(saved[name])} saved, "
            f"{tuple(tensors[name].shape)} here)"
        )
    if problems:
        raise UserError(
            f"{path} holds another model: {'; '.join(problems)}; resume with the model options of the run that wrote it"
        )


def broadcast_from_main(value):
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (NCCL reduces CUDA tensors only, gloo CPU ones)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())
