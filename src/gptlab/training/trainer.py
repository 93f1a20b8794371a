"""The training loop: Muon or AdamW (optimizers.py), warmup then cosine or WSD, gradient accumulation, bf16
autocast, an average of the weights (averaging.py), evaluation, checkpoints with exact resume, and
DistributedDataParallel under `torchrun`.

One process or many run the same code. The global batch (`batch_size` sequences per optimizer step)
is fixed by the settings; each of the `world` processes computes `micro_batch_size` sequences per
forward pass, and gradients accumulate over `batch_size / (micro_batch_size * world)` passes. So the
same command gives the same optimisation whether it runs on one process or on eight.

The loop stops at the first limit reached (max_steps, max_tokens, epochs, time_budget), when asked to
(Ctrl-C or SIGTERM: it saves `last` first), or when the loss or the gradient norm stops being finite
(it keeps the last good checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import is_gptlab_checkpoint, read_config, with_tied_head, write_folder_atomically, write_model_files
from ..config import GPTConfig
from ..data import Batch, TokenWindows, check_length
from ..model import GPTModel
from ..tokenizer import Tokenizer
from .averaging import WeightAverage
from .config import LIMITS, RunConfig, TrainConfig
from .data_record import write_record
from .dropout import DropoutSwitch, describe_dropout, dropout_scale, dropout_switch_note
from .evaluation import EvalResult, autocast, evaluate, loss_fn
from .fsdp import checkpoint_blocks, shard_model, unsharded_copy
from .optimizers import make_optimizer
from .runtime import (
    Runtime,
    TrainingError,
    agree_across_ranks,
    barrier,
    gather_rng_states,
    set_rng_state,
    start_runtime,
    stop_runtime,
    sum_across_ranks,
    with_training_dtype,
)
from .state import (
    RUN_MARKER,
    TrainerState,
    check_out_dir,
    link_or_copy_folder,
    load_model_weights,
    load_trainer_state,
    make_out_dir,
    read_log,
    save_checkpoint,
    write_log,
)
from .tracking import Tracker

# ----------------------------------------------------------------------------- optimisation


def learning_rate(cfg: TrainConfig, step: int, progress: float, warmup_steps: int | None = None) -> float:
    """Linear warmup over warmup_steps (default cfg's), then from lr to lr * min_lr_ratio as progress goes
    0 → 1: a cosine (cfg.schedule "cosine"), or lr held until 1 - cooldown_fraction and a line down ("wsd")."""
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    floor, progress = cfg.lr * cfg.min_lr_ratio, min(progress, 1.0)
    if cfg.schedule == "wsd":
        cooldown = max(0.0, progress - (1 - cfg.cooldown_fraction)) / cfg.cooldown_fraction
        return cfg.lr - (cfg.lr - floor) * cooldown
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def training_loss_fn(cfg: TrainConfig):
    """loss_fn, compiled with --compile: compiling the loss as well as the model lets inductor fuse the
    cast, log-softmax and cross-entropy, so the fp32 (B, T, V) logits are never materialised."""
    return torch.compile(loss_fn) if cfg.compile else loss_fn


# ----------------------------------------------------------------------------- the loop


class TrainingSource(Protocol):
    """What the loop trains on and evaluates with. TrainingData (a token stream) is one; fine-tuning
    tasks (instructions, classification) are others."""

    epoch_tokens: int  # tokens in one pass over the training data: what --epochs counts

    def batches(
        self, batch_size: int, seed: int, start_epoch: int, start_index: int, rank: int, world: int
    ) -> Iterator[Batch]:
        """Global batches (this rank's rows of each), endlessly, resumable from Batch.resume_at."""

    def evaluate(self, model: torch.nn.Module, batch_size: int, runtime: Runtime, dtype: str):
        """A validation result with .loss, .format() and .metrics() (recorded as val_<name>).

        A source whose attribute `bounded` is true scores a bounded estimate here (the same subset each
        time, so evaluations compare) and everything in evaluate_whole, which the run's end reports."""


@dataclass(frozen=True)
class TrainingData:
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_bytes: int  # UTF-8 bytes that the validation targets stand for: the bits-per-byte denominator
    sources: list[dict] | None = None  # what the tokens were read from (data_record.py), recorded by a new run
    token_bytes: np.ndarray | None = None  # UTF-8 bytes per token id: a bounded estimate's denominator

    def source(
        self, context_length: int, stride: int | None, eval_tokens: int | None = None, seed: int = 0
    ) -> "TokenSource":
        windows = TokenWindows(self.train_tokens, context_length, stride or context_length)
        check_length(self.val_tokens, context_length, "validation split")  # now, not at the first evaluation
        if eval_tokens is not None and self.token_bytes is None:
            raise ValueError("a bounded evaluation (eval_tokens) needs TrainingData.token_bytes")
        return TokenSource(self, windows, eval_tokens, seed)


@dataclass(frozen=True)
class TokenSource:
    """Pretraining on a token stream: windows of the training split; for validation every token of its
    split, or with eval_tokens a seeded subset of about that many targets (evaluate_whole: all of them)."""

    data: TrainingData
    windows: TokenWindows
    eval_tokens: int | None = None
    seed: int = 0

    @property
    def epoch_tokens(self) -> int:
        return len(self.data.train_tokens)

    @property
    def bounded(self) -> bool:
        return self.eval_tokens is not None

    def batches(self, *args) -> Iterator[Batch]:
        return self.windows.batches(*args)

    def evaluate(self, model, batch_size, runtime, dtype) -> EvalResult:
        if self.eval_tokens is None:
            return self.evaluate_whole(model, batch_size, runtime, dtype)
        return evaluate(
            model,
            self.data.val_tokens,
            self.data.val_bytes,
            batch_size,
            runtime,
            dtype,
            max_targets=self.eval_tokens,
            seed=self.seed,
            token_bytes=self.data.token_bytes,
        )

    def evaluate_whole(self, model, batch_size, runtime, dtype) -> EvalResult:
        return evaluate(model, self.data.val_tokens, self.data.val_bytes, batch_size, runtime, dtype)


@dataclass(frozen=True)
class ModelHooks:
    """How fine-tuning changes the model the loop trains and the files a checkpoint holds; the defaults
    are pretraining's. prepare runs once the weights are in place (before the optimizer is built), e.g. to
    add adapters or a classification head; write_model fills a checkpoint folder with the model's files and
    read_model(folder, model) reads them back on --resume; after_eval(out_dir, step, result) runs on rank 0
    after each evaluation is recorded (e.g. to write the responses an instruction-tuned model gave)."""

    prepare: Callable[[GPTModel], GPTModel] = lambda model: model
    write_model: Callable[..., None] = write_model_files
    read_model: Callable[[Path, GPTModel], None] = load_model_weights
    after_eval: Callable[[Path, int, object], None] = lambda out_dir, step, result: None


@dataclass
class TrainResult:
    state: TrainerState
    final_eval: EvalResult
    out_dir: Path
    stopped_by: str  # a limit's name ("max_steps", "epochs", ...), "interrupt" or "terminate"
    is_main: bool = True  # False in the processes other than rank 0 of a torchrun job


@dataclass(frozen=True)
class Plan:
    """The limits in force, and what they mean in steps when that is known before the run."""

    tokens_per_step: int
    epoch_tokens: int  # an epoch is as many tokens as the training split holds
    steps: int | None  # None when only a time budget limits the run
    warmup_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, tokens_per_step: int, epoch_tokens: int) -> "Plan":
        token_limits = [cfg.max_tokens, cfg.epochs * epoch_tokens if cfg.epochs else None]
        step_limits = [cfg.max_steps] + [math.ceil(t / tokens_per_step) for t in token_limits if t]
        steps = min((s for s in step_limits if s), default=None)
        # A warmup as long as the run would never reach the full rate: keep it to a tenth of the run.
        warmup = cfg.warmup_steps if steps is None or cfg.warmup_steps < steps else steps // 10
        return cls(tokens_per_step, epoch_tokens, steps, warmup)

    def epochs_at_end(self, state: TrainerState, progress: float) -> float:
        """The epochs the run will have seen when it stops: the tokens so far over the progress toward its
        nearest limit (for a time budget, an estimate from the speed so far); before any, the planned steps'."""
        if state.tokens_seen and progress > 0:
            return state.tokens_seen / self.epoch_tokens / progress
        return self.steps * self.tokens_per_step / self.epoch_tokens if self.steps else 0.0

    def describe(self, cfg: TrainConfig) -> list[str]:
        limits = []
        if cfg.max_steps:
            limits.append(f"{cfg.max_steps:,} steps")
        if cfg.max_tokens:
            limits.append(f"{cfg.max_tokens:,} tokens")
        if cfg.epochs:
            limits.append(
                f"{cfg.epochs:g} epoch{'s' * (cfg.epochs != 1)} ({cfg.epochs * self.epoch_tokens:,.0f} tokens)"
            )
        if cfg.time_budget:
            limits.append(f"{cfg.time_budget:g} s of training")
        length = f"{self.steps:,} steps of {self.tokens_per_step:,} tokens" if self.steps else "the time budget"
        stop = limits[0] if len(limits) == 1 else f"{' or '.join(limits)}, whichever comes first"
        lines = [
            f"stop after: {stop}",
            f"schedule: lr {cfg.lr:g}, linear warmup over {self.warmup_steps} steps, then "
            + (
                f"constant until the last {cfg.cooldown_fraction:.0%}, then a line"
                if cfg.schedule == "wsd"
                else "cosine"
            )
            + f" to {cfg.lr * cfg.min_lr_ratio:g} at the end of {length}",
        ]
        if cfg.ema_decay:
            lines.append(f"weights: evaluated and saved as their moving average (--ema-decay {cfg.ema_decay:g})")
        if cfg.time_budget:
            lines.append(
                "resume: the learning rate and dropout follow the clock toward the time budget, so a resumed "
                "run continues from the time spent but its steps are not an uninterrupted run's (a resume is "
                "exact under --max-steps, --max-tokens or --epochs alone)"
            )
        if self.warmup_steps != cfg.warmup_steps:
            lines.append(
                f"warning: --warmup-steps {cfg.warmup_steps} is longer than the run's {self.steps} steps; "
                f"warming up over {self.warmup_steps} instead"
            )
        return lines

    def progress(self, cfg: TrainConfig, state: TrainerState, elapsed: float) -> tuple[float, str]:
        """How far training is (1.0 = done) by whichever limit is closest, and which limit that is."""
        fractions = {
            "max_steps": state.step / cfg.max_steps if cfg.max_steps else 0.0,
            "max_tokens": state.tokens_seen / cfg.max_tokens if cfg.max_tokens else 0.0,
            "epochs": state.tokens_seen / (cfg.epochs * self.epoch_tokens) if cfg.epochs else 0.0,
            "time_budget": elapsed / cfg.time_budget if cfg.time_budget else 0.0,
        }
        limit = max(fractions, key=fractions.get)
        return fractions[limit], limit


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler preempting the job, `kill`, a container stopping) asks the
    loop to stop after the current step and save; a second signal aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may install handlers
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(
    model_cfg: GPTConfig,
    cfg: TrainConfig,
    tokenizer: Tokenizer,
    data: TrainingData | TrainingSource,
    runtime: Runtime | None = None,
    resume: bool = False,
    overwrite: bool = False,
    init_state: dict[str, torch.Tensor] | None = None,
    run: RunConfig | None = None,
    hooks: ModelHooks = ModelHooks(),
    log=print,
) -> TrainResult:
    """Train a GPTModel on `data`, writing checkpoints, metrics and a loss plot under cfg.out. `run`, the
    run's full settings, goes into each checkpoint for `--resume` and `gptlab eval`. Pass the runtime when
    the caller started it (to build the token cache before training)."""
    own_runtime = runtime is None
    runtime = start_runtime(cfg.device) if own_runtime else runtime
    try:
        return _train(runtime, model_cfg, cfg, tokenizer, data, resume, overwrite, init_state, run, hooks, log)
    finally:
        if own_runtime:
            stop_runtime(runtime)


def _train(runtime, model_cfg, cfg, tokenizer, data, resume, overwrite, init_state, run, hooks, log) -> TrainResult:
    out_dir = Path(cfg.out)
    if not any(getattr(cfg, name) for name in LIMITS):
        raise TrainingError(
            "give at least one limit so training can stop: --max-steps, --max-tokens, --epochs or --time-budget"
        )
    if cfg.dtype == "auto":  # called without the run pipeline, which resolves it before the model is made
        cfg = with_training_dtype(cfg, runtime.device, log if runtime.is_main else lambda line: None)
        run = run and replace(run, train=replace(run.train, dtype=cfg.dtype))
    if runtime.is_main:
        check_out_dir(out_dir, resume, overwrite)
    if resume:
        check_resume_config(out_dir, model_cfg)
    context = model_cfg.context_length
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // runtime.world)
    if cfg.batch_size % (micro * runtime.world):
        raise TrainingError(
            f"batch size {cfg.batch_size} is not a multiple of micro batch {micro} x {runtime.world} "
            "processes; choose --batch-size as a multiple of their product"
        )
    accum_steps = cfg.batch_size // (micro * runtime.world)
    source = data.source(context, cfg.stride, cfg.eval_tokens, cfg.seed) if isinstance(data, TrainingData) else data
    plan = Plan.of(cfg, cfg.batch_size * context, source.epoch_tokens)

    torch.manual_seed(cfg.seed)  # the same initial weights in every process (FSDP keeps each one's slice)
    model = GPTModel(model_cfg).to(runtime.device)
    if runtime.rank:
        torch.manual_seed(cfg.seed + runtime.rank)  # but each its own dropout masks
    if init_state is not None:
        model.load_state_dict(with_tied_head(model_cfg, dict(init_state)))
    elif cfg.pos_init == "sinusoidal":  # a resumed run loads its trained table over this below
        model.init_sinusoidal_positions()
    model = hooks.prepare(model)
    dropout = DropoutSwitch(model)
    dropout_note = describe_dropout(cfg, dropout, plan.epoch_tokens / plan.tokens_per_step)
    if cfg.fsdp:
        if not runtime.distributed:
            raise TrainingError(
                "--fsdp shards the model across processes; launch them with "
                "torchrun --nproc_per_node N -m gptlab train ... --fsdp"
            )
        model = shard_model(model, cfg.activation_checkpointing)
    elif cfg.activation_checkpointing:
        checkpoint_blocks(model)
    optimizer = make_optimizer(model, cfg)
    state = TrainerState()
    if resume:
        state = load_trainer_state(out_dir / "last", model, optimizer, hooks.read_model)
        if len(state.rng_states) == runtime.world:
            set_rng_state(runtime, state.rng_states[runtime.rank])
        elif runtime.is_main:
            log(
                f"random state: the run was saved by {len(state.rng_states)} processes and resumes in {runtime.world}, "
                "so each starts from its seed again: random draws from here (dropout masks) differ "
                "from an uninterrupted run"
            )
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    if average and resume:
        average.resume(out_dir / "last")
    if runtime.is_main:
        make_out_dir(out_dir)
        (out_dir / RUN_MARKER).write_text(json.dumps({"format": "gptlab-run"}) + "\n")
        if run is not None:
            (out_dir / "run.toml").write_text(run.to_toml())
        if not resume and getattr(data, "sources", None) is not None:
            write_record(out_dir, data.sources)
        if not resume:
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            drop_metrics_after(out_dir, state.step, log)
        tracker = Tracker(
            out_dir, cfg.loggers, run.to_toml() if run is not None else "", state.step if resume else None, log
        )
    else:
        tracker = None

    def record(values: dict) -> None:
        """A metrics record (main process only): metrics.jsonl, then the --logger targets."""
        record_metrics(out_dir, values)
        tracker.record(values)

    if runtime.is_main:
        for line in plan.describe(cfg):
            log(line)
    if dropout_note and runtime.is_main:
        log(dropout_note)
    net: torch.nn.Module = model  # FSDP shards the model itself; plain data parallelism wraps it
    if runtime.distributed and not cfg.fsdp:
        net = DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    compute_loss = training_loss_fn(cfg)
    bar = progress_bar(cfg, runtime)

    def say(line: str) -> None:
        """A log line on stdout that does not tear the progress bar on stderr."""
        if bar.disable:
            log(line)
        else:
            bar.write(line, file=sys.stdout)

    def evaluate_and_save(final: bool) -> EvalResult:
        with average.in_model() if average else nullcontext():  # the average is what a run reports and saves
            return evaluate_and_save_weights(final)

    def evaluate_and_save_weights(final: bool) -> EvalResult:
        nonlocal last_eval
        result = source.evaluate(net, micro, runtime, cfg.dtype)
        if not math.isfinite(result.loss):  # the last step broke the weights: keep them out of the checkpoints
            raise divergence_error("validation loss", result.loss, state.step, out_dir)
        improved = state.best_val_loss is None or result.loss < state.best_val_loss
        if improved:
            state.best_val_loss = result.loss
        state.rng_states = gather_rng_states(runtime)
        full_model = unsharded_copy(model) if cfg.fsdp else model  # every rank takes part; rank 0 gets it
        if cfg.fsdp:
            save_checkpoint(out_dir / "last", model, tokenizer, optimizer, state, run, hooks.write_model, full_model)
        if runtime.is_main:
            record(
                {
                    "step": state.step,
                    "tokens": state.tokens_seen,
                    **{f"val_{name}": value for name, value in result.metrics().items()},
                }
            )
            if not cfg.fsdp:
                save_checkpoint(
                    out_dir / "last", model, tokenizer, optimizer, state, run, hooks.write_model, average=average
                )
            if improved:
                write_folder_atomically(out_dir / "best", lambda folder: link_or_copy_folder(out_dir / "last", folder))
            plot_losses(out_dir)
            say(f"step {state.step}: val {result.format()}")
            hooks.after_eval(out_dir, state.step, result)
            if cfg.sample_tokens and not final:
                sample = sample_text(full_model, tokenizer, cfg.sample_tokens)
                say(f"sample: {sample!r}")
                tracker.text("sample", sample, state.step)
        last_eval = (state.step, result)
        return result

    last_eval: tuple[int, EvalResult] | None = None
    batches = source.batches(cfg.batch_size, cfg.seed, state.epoch, state.windows_in_epoch, runtime.rank, runtime.world)
    start = time.perf_counter() - state.elapsed
    resumed_at = state.step
    stopped_by, window_start, window_tokens = "max_steps", time.perf_counter(), 0
    model.train()
    with StopRequest() as stop:
        while True:
            elapsed = time.perf_counter() - start
            progress, limit = plan.progress(cfg, state, elapsed)
            progress, interrupted = agree_across_ranks(runtime, progress, stop.requested)
            show_progress(bar, progress, elapsed)
            if interrupted or progress >= 1.0:
                stopped_by = ("terminate" if stop.signal == signal.SIGTERM else "interrupt") if interrupted else limit
                state.elapsed = elapsed  # what the time budget was measured against, so a resume sees it spent
                break
            lr = learning_rate(cfg, state.step, progress, plan.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            run_epochs = plan.epochs_at_end(state, progress)
            scale = dropout_scale(cfg, state.tokens_seen / plan.epoch_tokens, run_epochs, progress, state.dropout_scale)
            if scale and scale != state.dropout_scale and dropout.any and runtime.is_main:
                say(f"step {state.step}: {dropout_switch_note(dropout, scale, run_epochs)}")
            state.dropout_scale = scale
            dropout.set(scale)
            batch = next(batches)  # this rank's rows of the global batch: (micro * accum_steps, context)
            x, y = torch.from_numpy(batch.inputs).to(runtime.device), torch.from_numpy(batch.targets).to(runtime.device)
            step_loss = 0.0
            for i, (xm, ym) in enumerate(zip(x.split(micro), y.split(micro))):
                last_micro = i == accum_steps - 1  # gradients are reduced across processes after it only
                if cfg.fsdp:
                    model.set_requires_gradient_sync(last_micro)
                sync = nullcontext() if last_micro or net is model else net.no_sync()
                with sync:
                    with autocast(runtime, cfg.dtype):
                        loss = compute_loss(net, xm, ym) / accum_steps
                    loss.backward()
                step_loss += loss.item()
            (step_loss,) = sum_across_ranks(runtime, step_loss / runtime.world)  # every rank sees a NaN anywhere
            if not math.isfinite(step_loss):
                raise divergence_error("loss", step_loss, state.step + 1, out_dir)
            # The norm is measured whether or not it is clipped (max_norm inf leaves the gradients as they are).
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            grad_norm = float(grad_norm.full_tensor() if cfg.fsdp else grad_norm)  # FSDP: a norm over every shard
            if not math.isfinite(grad_norm):  # the step would write inf or NaN into the weights
                raise divergence_error("gradient norm", grad_norm, state.step + 1, out_dir)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if average:
                average.update(state.step)
            state.tokens_seen += plan.tokens_per_step
            state.epoch, state.windows_in_epoch = batch.resume_at
            state.elapsed = time.perf_counter() - start
            window_tokens += plan.tokens_per_step
            if state.step % cfg.log_interval == 0:
                tokens_per_s = window_tokens / (time.perf_counter() - window_start)
                window_start, window_tokens = time.perf_counter(), 0
                if runtime.is_main:
                    values = {
                        "step": state.step,
                        "tokens": state.tokens_seen,
                        "train_loss": step_loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                        "elapsed": state.elapsed,
                    }
                    record(values)
                    say(format_log_line(values, plan.steps))
                    bar.set_postfix_str(f"loss {step_loss:.4f}, grad norm {grad_norm:.2f}")
            if state.step % cfg.eval_interval == 0:
                evaluate_and_save(final=False)
    bar.close()
    if resume and state.step == resumed_at and stopped_by == "time_budget" and runtime.is_main:
        log(
            f"nothing to train: the run's time budget of {cfg.time_budget:g} s is spent ({state.elapsed:.0f} s trained) "
            "and a run stops at whichever limit comes first; to train on, resume with a larger --time-budget"
        )
    elif resume and state.step == resumed_at and stopped_by not in ("interrupt", "terminate") and runtime.is_main:
        log(
            f"nothing to train: the run's --{stopped_by.replace('_', '-')} is reached at step {state.step}; to train "
            f"on, resume with a larger --{stopped_by.replace('_', '-')}"
        )
    final = last_eval[1] if last_eval and last_eval[0] == state.step else evaluate_and_save(final=True)
    if getattr(source, "bounded", False):  # the in-run figures were estimates: the end scores everything
        with average.in_model() if average else nullcontext():
            final = source.evaluate_whole(net, micro, runtime, cfg.dtype)
        if runtime.is_main:
            record(
                {
                    "step": state.step,
                    "tokens": state.tokens_seen,
                    **{f"final_val_{name}": value for name, value in final.metrics().items()},
                }
            )
            say(f"step {state.step}: val on the whole split {final.format()}")
    if stopped_by in ("interrupt", "terminate") and runtime.is_main:
        what = "SIGTERM" if stopped_by == "terminate" else "Ctrl-C"
        log(
            f"stopped by {what} at step {state.step}; checkpoint saved in {out_dir / 'last'}; "
            f"continue with: gptlab train --out {out_dir} --resume"
        )
    if tracker is not None:
        tracker.close()
    barrier(runtime)  # no rank tears the process group down while another still uses it
    return TrainResult(state, final, out_dir, stopped_by, runtime.is_main)


def check_resume_config(out_dir: Path, model_cfg: GPTConfig) -> None:
    saved, _, _ = read_config(out_dir / "last")
    if saved != model_cfg:
        diffs = [
            f"{k} {getattr(saved, k)} (checkpoint) vs {getattr(model_cfg, k)} (given)"
            for k in saved.to_dict()
            if getattr(saved, k) != getattr(model_cfg, k)
        ]
        raise TrainingError(f"--resume: the checkpoint's model differs from the one given: {'; '.join(diffs)}")


def divergence_error(what: str, value: float, step: int, out_dir: Path) -> TrainingError:
    last = out_dir / "last"
    kept = f"the last good checkpoint is {last}" if is_gptlab_checkpoint(last) else "no checkpoint was saved before it"
    return TrainingError(f"{what} became {value} at step {step}; {kept}; lower --lr or use --dtype float32")


def format_log_line(record: dict, steps: int | None) -> str:
    of = f"/{steps:,}" if steps else ""
    return (
        f"step {record['step']:,}{of} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | {record['elapsed']:.1f} s"
    )


def drop_metrics_after(out_dir: Path, step: int, log) -> None:
    """A run that crashed or was aborted logged steps after its last checkpoint; resuming trains them again.
    A last line the crash cut short is dropped too, and said."""
    path = out_dir / "metrics.jsonl"
    records, torn = read_log(path)
    if torn:
        log(f"{path}: dropped its last line, cut short by the crash")
    if path.exists():
        write_log(path, [record for record in records if record["step"] <= step])


def record_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(out_dir: Path) -> None:
    """loss.png: train and val loss against tokens seen, redrawn from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(out_dir / "metrics.jsonl")[0]
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
    """A short sample (temperature 0.8, top-k 40, fixed seed) to show progress at each evaluation. It decodes
    with the weights as they are (no prepared copy: they change every step, and a model carrying LoRA
    adapters has no plain GPTModel weights to copy)."""
    from ..inference.decoder import DecoderSettings
    from ..inference.generate import GenerationOptions, generate_text

    was_training = model.training
    model.eval()
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=0)
    (text,) = generate_text(model, tokenizer, [prompt], options, DecoderSettings(prepare_weights=False))
    model.train(was_training)
    return text


def progress_bar(cfg: TrainConfig, runtime: Runtime):
    """A bar on stderr that counts progress toward the nearest limit. tqdm's own ETA extrapolates from the
    bar's rate, which is wrong for a time budget (it measured seconds as progress units); show_progress
    writes the time left from the fraction done instead."""
    from tqdm import tqdm

    return tqdm(
        total=BAR_UNITS,
        disable=not (cfg.progress and runtime.is_main),
        file=sys.stderr,
        bar_format="{percentage:3.0f}%|{bar}| {desc} {postfix}",
    )


BAR_UNITS = 1000


def show_progress(bar, progress: float, elapsed: float) -> None:
    if bar.disable:
        return
    done = min(progress, 1.0)
    left = elapsed * (1 - done) / done if done > 0 else None
    bar.set_description_str(f"{elapsed:.0f} s" + (f", ~{left:.0f} s left" if left is not None else ""), refresh=False)
    bar.update(round(done * BAR_UNITS) - bar.n)
