"""Devices and processes: which device a run uses, and the process group when `torchrun` starts several."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..errors import UserError
from ..torch_compat import onednn_bf16_supported
from .config import TrainConfig


class TrainingError(UserError):
    """A problem with the run the user asked for: reported as one line, non-zero exit."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # rank within this machine: local rank 0 does the machine's one-off work

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {name} was asked for but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


def computes_bfloat16(device: torch.device) -> bool:
    """Whether the device has bfloat16 arithmetic of its own. On a CPU that is what oneDNN's bfloat16
    kernels need (AVX-512 or AMX on x86, BF16 on Arm); without it PyTorch emulates bfloat16, and a
    training step runs many times slower than in float32 (docs/benchmarks.md#training-dtype)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return onednn_bf16_supported()
    return True  # MPS: bfloat16 autocast on Apple silicon


def training_dtype(name: str, device: torch.device) -> tuple[str, str | None]:
    """The autocast dtype for --dtype `name` on the device, and a line for the log when there is something
    to say: what "auto" chose, or that an explicit bfloat16 will be emulated."""
    native = computes_bfloat16(device)
    if name == "auto":
        dtype = "bfloat16" if native else "float32"
        why = "has bfloat16 arithmetic" if native else "has no bfloat16 arithmetic (PyTorch would emulate it)"
        return dtype, f"dtype: {dtype} (--dtype auto: this {device.type.upper()} {why})"
    if name == "bfloat16" and not native:
        return name, (
            f"warning: --dtype bfloat16 on a {device.type.upper()} without bfloat16 arithmetic: PyTorch "
            "emulates it, several times slower than float32; leave --dtype out (auto) or pass --dtype float32"
        )
    return name, None


def with_training_dtype(cfg: TrainConfig, device: torch.device, log: Callable[[str], None]) -> TrainConfig:
    """cfg with its dtype resolved for the device (training_dtype), logging what needs saying."""
    dtype, line = training_dtype(cfg.dtype, device)
    if line:
        log(line)
    return cfg if dtype == cfg.dtype else replace(cfg, dtype=dtype)


def start_runtime(device_name: str) -> Runtime:
    """Join the process group when launched by torchrun (it sets RANK/WORLD_SIZE), else run alone."""
    device = pick_device(device_name)
    if device.type == "cuda":
        # TF32 matrix products: about 8x the fp32 rate on Ampere and later, at bf16-like input precision,
        # which the bf16 autocast of training already accepts.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return Runtime(device)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world, local_rank)


def stop_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        # Sharded tensors still referring to the group, if left for the interpreter's exit, are freed in an
        # arbitrary order there, which now and then aborted a gloo process ("terminate called without an
        # active exception", about one FSDP run in four): free them now.
        gc.collect()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def sum_across_ranks(runtime: Runtime, *values: float) -> list[float]:
    if not runtime.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def mean_across_ranks(runtime: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks, on the device (no host sync)."""
    if not runtime.distributed:
        return tensor
    tensor = tensor / runtime.world
    dist.all_reduce(tensor)
    return tensor


def max_across_ranks(runtime: Runtime, value: int) -> int:
    if not runtime.distributed:
        return value
    tensor = torch.tensor([value], device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def agree_across_ranks(runtime: Runtime, progress: float, stop_requested: bool) -> tuple[float, bool]:
    """Every rank must leave the loop at the same step: take the furthest progress and any stop request."""
    if not runtime.distributed:
        return progress, stop_requested
    flags = torch.tensor([progress, float(stop_requested)], device=runtime.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags[0].item(), bool(flags[1].item())


def rng_state(runtime: Runtime) -> dict[str, torch.Tensor]:
    """This process's random state: the CPU generator's, and the GPU's when it trains on one."""
    state = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def set_rng_state(runtime: Runtime, state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


def gather_rng_states(runtime: Runtime) -> list[dict[str, torch.Tensor]]:
    """Every rank's random state, in rank order (on every rank)."""
    state = rng_state(runtime)
    if not runtime.distributed:
        return [state]
    states: list = [None] * runtime.world
    dist.all_gather_object(states, {key: value.cpu() for key, value in state.items()})
    return states
