"""Trains a tiny GPTModel a few steps on fixed synthetic tokens, for tests/training/test_fsdp.py.

Alone (no torchrun) it trains the plain model in one process; under torchrun it shards the model with
gptlab.training.fsdp and each rank takes its rows of every global batch. Either way every step is the
trainer's: loss_fn over micro-batches with gradient accumulation, clip_grad_norm_, AdamW from
make_optimizer, the warmup + cosine learning rate. The losses (global batch means) go to OUT/losses.json,
the final weights to the gptlab checkpoint OUT/model.

    torchrun --nproc_per_node 2 --standalone tests/training/fsdp_worker.py --fsdp --steps 6 --save-after 3 --out run/
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from gptlab.checkpoint import save_model
from gptlab.config import GPTConfig
from gptlab.model import GPTModel
from gptlab.tokenizer import CharTokenizer
from gptlab.training import fsdp
from gptlab.training.config import TrainConfig
from gptlab.training.evaluation import loss_fn
from gptlab.training.optimizers import make_optimizer
from gptlab.training.runtime import Runtime, stop_runtime
from gptlab.training.schedule import learning_rate

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ,.")  # 65 ids
BATCH, MICRO_BATCH, MAX_STEPS = 8, 2, 6  # global batch; sequences per forward pass per process


def model_config() -> GPTConfig:
    # A tied head and qkv bias, as in GPT-2's checkpoints: the tied weight is shared by two modules. No
    # dropout: one process and two draw different masks.
    return GPTConfig(
        vocab_size=TOKENIZER.vocab_size,
        context_length=16,
        emb_dim=32,
        n_heads=2,
        n_layers=2,
        drop_rate=0.0,
        qkv_bias=True,
        tie_embeddings=True,
    )


def train_config() -> TrainConfig:
    # grad_clip 0.5 clips every step here: the norm must then be taken over all ranks' shards.
    return TrainConfig(
        optimizer="adamw",
        batch_size=BATCH,
        lr=1e-2,
        warmup_steps=2,
        max_steps=MAX_STEPS,
        grad_clip=0.5,
        dtype="float32",
        device="cpu",
    )


def global_batch(cfg: GPTConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed inputs and targets of one step, the same in every process: (BATCH, context) each."""
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(cfg.vocab_size, (BATCH, cfg.context_length + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def new_model_and_optimizer(
    shard: bool, activation_checkpointing: bool = False, mixed_precision: str | None = None
) -> tuple[GPTModel, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights in every process; shard_model keeps each rank's slice
    model = GPTModel(model_config())
    if shard:
        model = fsdp.shard_model(model, activation_checkpointing, mixed_precision)
    return model, make_optimizer(model, train_config())


def train_steps(
    model: GPTModel, optimizer: torch.optim.Optimizer, first_step: int, last_step: int, rank: int = 0, world: int = 1
) -> list[float]:
    """Steps first_step + 1 ... last_step; each rank takes its contiguous rows of the global batch."""
    cfg, train_cfg = model.cfg, train_config()
    rows = BATCH // world
    accum_steps = rows // MICRO_BATCH
    losses = []
    for step in range(first_step, last_step):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(train_cfg, step, step / MAX_STEPS)
        x, y = global_batch(cfg, step)
        x, y = x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]  # (rows, context)
        step_loss = torch.zeros(())
        for i, (xm, ym) in enumerate(zip(x.split(MICRO_BATCH), y.split(MICRO_BATCH))):
            if world > 1:  # reduce-scatter the gradients once, after the last micro-batch
                model.set_requires_gradient_sync(i == accum_steps - 1)
            loss = loss_fn(model, xm, ym) / accum_steps
            loss.backward()
            step_loss += loss.detach()
        if world > 1:
            dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def failed_save_errors(path: Path, model: GPTModel, optimizer: torch.optim.Optimizer) -> list[str]:
    """Save over `path` again with rank 0 failing after the shards are written; every rank's error."""

    def fail(folder: Path) -> None:
        raise OSError("disk full (simulated)")

    try:
        fsdp.save_sharded(path, model, optimizer, extra={"step": -1}, write_main=fail)
        error = "no error"
    except (OSError, RuntimeError) as raised:
        error = f"{type(raised).__name__}: {raised}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True, help="train up to this step")
    parser.add_argument("--out", type=Path, required=True, help="folder for losses.json and the final model")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", choices=["bfloat16"])
    parser.add_argument("--save-after", type=int, help="write a sharded checkpoint to OUT/sharded after this step")
    parser.add_argument("--resume", type=Path, help="start from this sharded checkpoint")
    parser.add_argument("--fail-a-save", action="store_true", help="after --save-after, try a save that fails")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a fixed thread count keeps float sums in the same order from run to run

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model, optimizer = new_model_and_optimizer(args.fsdp, args.activation_checkpointing, args.mixed_precision)
    step = fsdp.load_sharded(args.resume, model, optimizer)["step"] if args.resume else 0
    losses, errors = [], []
    for stop in sorted({args.save_after or args.steps, args.steps}):
        losses += train_steps(model, optimizer, step, stop, rank, world)
        step = stop
        if stop == args.save_after:
            fsdp.save_sharded(args.out / "sharded", model, optimizer, extra={"step": step})
            if args.fail_a_save:
                errors = failed_save_errors(args.out / "sharded", model, optimizer)
    full_model = fsdp.unsharded_copy(model) if args.fsdp else model  # every rank takes part; rank 0 gets it
    if rank == 0:
        save_model(args.out / "model", full_model, TOKENIZER)
        record = {"losses": losses, "world": world, "failed_save_errors": errors}
        (args.out / "losses.json").write_text(json.dumps(record))
    if distributed:
        stop_runtime(Runtime(torch.device("cpu"), rank, world))


if __name__ == "__main__":
    main()
