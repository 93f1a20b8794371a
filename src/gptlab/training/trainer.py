"""Pretraining: AdamW, warmup + cosine schedule, gradient accumulation, bf16 autocast, evaluation,
checkpoints with exact resume, and DistributedDataParallel under `torchrun`.

One process or many run the same code. The global batch (`batch_size` sequences per optimizer step)
is fixed by the command line; each of the `world` processes computes `micro_batch_size` sequences per
forward pass, and gradients accumulate over `batch_size / (micro_batch_size * world)` passes. So the
same command gives the same optimisation whether it runs on one process or on eight.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (
    is_gptlab_checkpoint,
    read_config,
    restore_interrupted_swap,
    with_tied_head,
    write_folder_atomically,
    write_model_files,
)
from ..config import GPTConfig
from ..data import IGNORE_INDEX, TokenWindows, check_length, validation_batches
from ..model import GPTModel
from ..tokenizer import Tokenizer

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
RUN_MARKER = "gptlab-run.json"


class TrainingError(Exception):
    """A problem with the run the user asked for: reported as one line, non-zero exit."""


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    batch_size: int = 32  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # sequences per forward pass per process (default: batch / world)
    stride: int | None = None  # window start spacing in tokens (None: context_length, no overlap)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    pos_init: str = "gpt2"  # position table of a new model: "gpt2" (random) or "sinusoidal"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    time_budget: float | None = None  # seconds of training
    eval_interval: int = 250
    sample_tokens: int = 200
    dtype: str = "bfloat16"  # autocast dtype, or "float32"
    compile: bool = False
    seed: int = 1337
    device: str = "auto"
    log_interval: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if not (self.max_steps or self.max_tokens or self.time_budget):
            raise ValueError("give at least one of max_steps, max_tokens or time_budget so training can stop")
        for name in ("batch_size", "eval_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.pos_init not in ("gpt2", "sinusoidal"):
            raise ValueError(f"pos_init must be gpt2 or sinusoidal, got {self.pos_init!r}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")


# ----------------------------------------------------------------------------- devices and processes


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

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
        raise TrainingError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def start_runtime(device_name: str) -> Runtime:
    """Join the process group when launched by torchrun (it sets RANK/WORLD_SIZE), else run alone."""
    if "RANK" not in os.environ:
        return Runtime(pick_device(device_name))
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world)


def stop_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(runtime: Runtime, *values: float) -> list[float]:
    if not runtime.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (linear weights, embeddings), not on biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel per step instead of a dozen
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio as progress goes 0 → 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast(runtime: Runtime, dtype: str):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=torch.bfloat16)


def training_loss_fn(cfg: TrainConfig):
    """loss_fn, compiled with --compile: compiling the loss as well as the model lets inductor fuse the
    cast, log-softmax and cross-entropy, so the fp32 (B, T, V) logits are never materialised."""
    return torch.compile(loss_fn) if cfg.compile else loss_fn


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean nats per token
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.loss * self.tokens / math.log(2) / self.bytes

    def format(self) -> str:
        return (f"loss {self.loss:.4f}  perplexity {self.perplexity:.2f}  bits/byte {self.bits_per_byte:.4f}  "
                f"({self.tokens:,} tokens, {self.bytes:,} bytes)")


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, n_bytes: int, batch_size: int,
             runtime: Runtime = Runtime(torch.device("cpu")), dtype: str = "float32") -> EvalResult:
    """Loss over every token of `tokens` (each predicted once), in non-overlapping context windows.
    Under DDP each rank takes its share of the windows and the sums are reduced."""
    was_training = model.training
    model.eval()
    context = unwrap(model).cfg.context_length
    total_loss, total_tokens = 0.0, 0
    with autocast(runtime, dtype):
        for x, y in validation_batches(tokens, context, batch_size, runtime.rank, runtime.world):
            x, y = torch.from_numpy(x).to(runtime.device), torch.from_numpy(y).to(runtime.device)
            total_loss += loss_fn(model, x, y, reduction="sum").item()
            total_tokens += int((y != IGNORE_INDEX).sum())
    total_loss, total_tokens = sum_across_ranks(runtime, total_loss, total_tokens)
    model.train(was_training)
    return EvalResult(total_loss / total_tokens, int(total_tokens), n_bytes)


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside a DistributedDataParallel wrapper (--compile compiles the loss, not the module)."""
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class TrainerState:
    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    windows_in_epoch: int = 0  # windows of this epoch's order already consumed
    elapsed: float = 0.0  # training seconds before this process started
    best_val_loss: float | None = None
    rng_states: list[torch.Tensor] = field(default_factory=list, repr=False)  # one per rank


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state under the parameter's name, e.g. 'tok_emb.weight.exp_avg'."""
    tensors = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"{names[param]}.{key}"] = value.detach().reshape(value.shape).contiguous().cpu()
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                           tensors: dict[str, torch.Tensor]) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            prefix = f"{names[param]}."
            state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            if state:
                optimizer.state[param] = {
                    key: value if key == "step" else value.to(param.device) for key, value in state.items()
                }


def save_checkpoint(path: Path, model: GPTModel, tokenizer: Tokenizer, optimizer: torch.optim.Optimizer,
                    state: TrainerState, train_cfg: TrainConfig) -> None:
    names = {param: name for name, param in model.named_parameters()}

    def write(folder: Path) -> None:
        write_model_files(folder, model, tokenizer, extra={"step": state.step, "tokens_seen": state.tokens_seen})
        save_file(optimizer_tensors(optimizer, names), str(folder / OPTIMIZER_FILE))
        save_file({f"rng.{rank}": rng for rank, rng in enumerate(state.rng_states)}, str(folder / "rng.safetensors"))
        fields = {k: v for k, v in dataclasses.asdict(state).items() if k != "rng_states"}
        document = {"trainer": fields, "train_config": dataclasses.asdict(train_cfg)}
        (folder / STATE_FILE).write_text(json.dumps(document, indent=2) + "\n")

    write_folder_atomically(path, write)


def load_trainer_state(path: Path, model: GPTModel, optimizer: torch.optim.Optimizer) -> TrainerState:
    names = {param: name for name, param in model.named_parameters()}
    model.load_state_dict(with_tied_head(model.cfg, load_file(str(path / "model.safetensors"))))
    load_optimizer_tensors(optimizer, names, load_file(str(path / OPTIMIZER_FILE)))
    rngs = load_file(str(path / "rng.safetensors"))
    fields = json.loads((path / STATE_FILE).read_text())["trainer"]
    return TrainerState(**fields, rng_states=[rngs[f"rng.{rank}"] for rank in range(len(rngs))])


# ----------------------------------------------------------------------------- the run folder


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a folder holding files that are not a gptlab run; never clobber a run
    unless asked; make sure we can write before spending any time on training."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"output path {out_dir} is a file, not a folder; choose another --out")
    entries = [p.name for p in out_dir.iterdir()] if out_dir.is_dir() else []
    ours = RUN_MARKER in entries
    if entries and not ours:
        raise TrainingError(f"output folder {out_dir} holds files that are not a gptlab run ({', '.join(sorted(entries)[:3])}...); "
                            "choose an empty or new --out")
    if resume:
        restore_interrupted_swap(out_dir / "last")
    if resume and not is_gptlab_checkpoint(out_dir / "last"):
        raise TrainingError(f"--resume: no checkpoint at {out_dir / 'last'}; start without --resume or point --out at a run")
    if ours and not resume and not overwrite:
        raise TrainingError(f"output folder {out_dir} already holds a gptlab run; continue it with --resume, "
                            "replace it with --overwrite, or choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"cannot write to output folder {out_dir}: {error.strerror}; choose a writable --out") from None


def check_resume_config(out_dir: Path, model_cfg: GPTConfig) -> None:
    saved, _, _ = read_config(out_dir / "last")
    if saved != model_cfg:
        diffs = [f"{k} {getattr(saved, k)} (checkpoint) vs {getattr(model_cfg, k)} (command line)"
                 for k in saved.to_dict() if getattr(saved, k) != getattr(model_cfg, k)]
        raise TrainingError(f"--resume: the checkpoint's model differs from the command line: {'; '.join(diffs)}; "
                            "pass the same model options as the original run")


# ----------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class TrainingData:
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_bytes: int  # UTF-8 bytes that the validation targets stand for: the bits-per-byte denominator


@dataclass
class TrainResult:
    state: TrainerState
    final_eval: EvalResult
    out_dir: Path
    stopped_by: str  # "max_steps", "max_tokens", "time_budget" or "interrupt"


def progress_fraction(cfg: TrainConfig, state: TrainerState, elapsed: float) -> tuple[float, str]:
    """How far training is (1.0 = done) by whichever limit is closest, and which limit that is."""
    fractions = {"max_steps": state.step / cfg.max_steps if cfg.max_steps else 0.0,
                 "max_tokens": state.tokens_seen / cfg.max_tokens if cfg.max_tokens else 0.0,
                 "time_budget": elapsed / cfg.time_budget if cfg.time_budget else 0.0}
    limit = max(fractions, key=fractions.get)
    return fractions[limit], limit


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step (it then saves); a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def train(model_cfg: GPTConfig, cfg: TrainConfig, tokenizer: Tokenizer, data: TrainingData,
          runtime: Runtime | None = None, resume: bool = False, overwrite: bool = False,
          init_state: dict[str, torch.Tensor] | None = None, log=print) -> TrainResult:
    """Train a GPTModel on `data`, writing checkpoints, metrics and a loss plot under cfg.out_dir.
    Pass the runtime when the caller started it (to build the token cache before training)."""
    if runtime is not None:
        return _train(runtime, model_cfg, cfg, tokenizer, data, resume, overwrite, init_state, log)
    runtime = start_runtime(cfg.device)
    try:
        return _train(runtime, model_cfg, cfg, tokenizer, data, resume, overwrite, init_state, log)
    finally:
        stop_runtime(runtime)


def _train(runtime, model_cfg, cfg, tokenizer, data, resume, overwrite, init_state, log) -> TrainResult:
    out_dir = Path(cfg.out_dir)
    if runtime.is_main:
        check_out_dir(out_dir, resume, overwrite)
    if resume:
        check_resume_config(out_dir, model_cfg)
    context = model_cfg.context_length
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // runtime.world)
    if cfg.batch_size % (micro * runtime.world):
        raise TrainingError(f"batch size {cfg.batch_size} is not a multiple of micro batch {micro} x {runtime.world} "
                            "processes; choose --batch-size as a multiple of their product")
    accum_steps = cfg.batch_size // (micro * runtime.world)
    windows = TokenWindows(data.train_tokens, context, cfg.stride or context)
    check_length(data.val_tokens, context, "validation split")  # now, not at the first evaluation

    torch.manual_seed(cfg.seed + runtime.rank)
    model = GPTModel(model_cfg).to(runtime.device)
    if init_state is not None:
        model.load_state_dict(with_tied_head(model_cfg, dict(init_state)))
    elif cfg.pos_init == "sinusoidal":  # a resumed run loads its trained table over this below
        model.init_sinusoidal_positions()
    optimizer = make_optimizer(model, cfg)
    state = TrainerState()
    if resume:
        state = load_trainer_state(out_dir / "last", model, optimizer)
        if len(state.rng_states) == runtime.world:
            torch.set_rng_state(state.rng_states[runtime.rank])
    if runtime.is_main:
        marker = {"format": "gptlab-run", "model": model_cfg.to_dict(), "train": dataclasses.asdict(cfg)}
        (out_dir / RUN_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if not resume:
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            drop_metrics_after(out_dir, state.step)
    net: torch.nn.Module = model
    if runtime.distributed:
        net = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    compute_loss = training_loss_fn(cfg)

    def evaluate_and_save(final: bool) -> EvalResult:
        nonlocal last_eval
        result = evaluate(net, data.val_tokens, data.val_bytes, micro, runtime, cfg.dtype)
        if not math.isfinite(result.loss):  # the last step broke the weights: keep them out of the checkpoints
            raise divergence_error("validation loss", result.loss, state.step, out_dir)
        improved = state.best_val_loss is None or result.loss < state.best_val_loss
        if improved:
            state.best_val_loss = result.loss
        state.rng_states = gather_rng_states(runtime)
        if runtime.is_main:
            record_metrics(out_dir, {"step": state.step, "tokens": state.tokens_seen, "val_loss": result.loss,
                                     "val_perplexity": result.perplexity, "val_bits_per_byte": result.bits_per_byte})
            save_checkpoint(out_dir / "last", model, tokenizer, optimizer, state, cfg)
            if improved:
                write_folder_atomically(out_dir / "best", lambda folder: copy_folder(out_dir / "last", folder))
            plot_losses(out_dir)
            log(f"step {state.step}: val {result.format()}")
            if cfg.sample_tokens and not final:
                log(f"sample: {sample_text(model, tokenizer, cfg.sample_tokens)!r}")
        last_eval = (state.step, result)
        return result

    last_eval: tuple[int, EvalResult] | None = None
    tokens_per_step = cfg.batch_size * context
    batches = windows.batches(cfg.batch_size, cfg.seed, state.epoch, state.windows_in_epoch, runtime.rank, runtime.world)
    start = time.perf_counter() - state.elapsed
    bar = progress_bar(cfg, runtime)
    stopped_by, window_start, window_tokens = "max_steps", time.perf_counter(), 0
    model.train()
    with StopRequest() as stop:
        while True:
            elapsed = time.perf_counter() - start
            progress, limit = progress_fraction(cfg, state, elapsed)
            progress, interrupted = agree_across_ranks(runtime, progress, stop.requested)
            if interrupted or progress >= 1.0:
                stopped_by = "interrupt" if interrupted else limit
                state.elapsed = elapsed  # what the time budget was measured against, so a resume sees it spent
                break
            lr = learning_rate(cfg, state.step, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)  # this rank's rows of the global batch: (micro * accum_steps, context)
            x, y = torch.from_numpy(batch.inputs).to(runtime.device), torch.from_numpy(batch.targets).to(runtime.device)
            step_loss = 0.0
            for i, (xm, ym) in enumerate(zip(x.split(micro), y.split(micro))):
                last_micro = i == accum_steps - 1
                sync = nullcontext() if last_micro or not runtime.distributed else net.no_sync()
                with sync:
                    with autocast(runtime, cfg.dtype):
                        loss = compute_loss(net, xm, ym) / accum_steps
                    loss.backward()
                step_loss += loss.item()
            (step_loss,) = sum_across_ranks(runtime, step_loss / runtime.world)  # every rank sees a NaN anywhere
            if not math.isfinite(step_loss):
                raise divergence_error("loss", step_loss, state.step + 1, out_dir)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.epoch, state.windows_in_epoch = batch.resume_at
            state.elapsed = time.perf_counter() - start
            window_tokens += tokens_per_step
            if state.step % cfg.log_interval == 0:
                tokens_per_s = window_tokens / (time.perf_counter() - window_start)
                window_start, window_tokens = time.perf_counter(), 0
                if runtime.is_main:
                    record_metrics(out_dir, {"step": state.step, "tokens": state.tokens_seen, "train_loss": step_loss,
                                             "lr": lr, "tokens_per_s": tokens_per_s, "elapsed": state.elapsed})
                    bar.set_postfix(step=state.step, loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update(min(progress, 1.0) - bar.n)
            if state.step % cfg.eval_interval == 0:
                evaluate_and_save(final=False)
    bar.close()
    final = last_eval[1] if last_eval and last_eval[0] == state.step else evaluate_and_save(final=True)
    if stopped_by == "interrupt" and runtime.is_main:
        log(f"interrupted at step {state.step}; checkpoint saved in {out_dir / 'last'}; "
            f"continue with the same command plus --resume")
    if runtime.distributed:
        dist.barrier()  # no rank tears the process group down while another still uses it
    return TrainResult(state, final, out_dir, stopped_by)


def divergence_error(what: str, value: float, step: int, out_dir: Path) -> TrainingError:
    last = out_dir / "last"
    kept = f"the last good checkpoint is {last}" if is_gptlab_checkpoint(last) else "no checkpoint was saved before it"
    return TrainingError(f"{what} became {value} at step {step}; {kept}; lower --lr or use --dtype float32")


def agree_across_ranks(runtime: Runtime, progress: float, stop_requested: bool) -> tuple[float, bool]:
    """Every rank must leave the loop at the same step: take the furthest progress and any Ctrl-C."""
    if not runtime.distributed:
        return progress, stop_requested
    flags = torch.tensor([progress, float(stop_requested)], device=runtime.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags[0].item(), bool(flags[1].item())


def gather_rng_states(runtime: Runtime) -> list[torch.Tensor]:
    state = torch.get_rng_state()
    if not runtime.distributed:
        return [state]
    states: list = [None] * runtime.world
    dist.all_gather_object(states, state)
    return states


def drop_metrics_after(out_dir: Path, step: int) -> None:
    """A run that crashed or was aborted logged steps after its last checkpoint; resuming trains them again."""
    path = out_dir / "metrics.jsonl"
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def record_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def copy_folder(source: Path, target: Path) -> None:
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())


def plot_losses(out_dir: Path) -> None:
    """loss.png: train and val loss against tokens seen, redrawn from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in [("train_loss", "train"), ("val_loss", "validation")]:
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, out_dir / "loss.png")


def sample_text(model: GPTModel, tokenizer: Tokenizer, max_new_tokens: int, prompt: str = "") -> str:
    """A short sample (temperature 0.8, top-k 40, fixed seed) to show progress at each evaluation."""
    from ..inference.generate import GenerationOptions, generate_text

    was_training = model.training
    model.eval()
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=0)
    (text,) = generate_text(model, tokenizer, [prompt], options)
    model.train(was_training)
    return text


def progress_bar(cfg: TrainConfig, runtime: Runtime):
    from tqdm import tqdm

    return tqdm(total=1.0, disable=not (cfg.progress and runtime.is_main), file=sys.stderr,
                bar_format="{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
