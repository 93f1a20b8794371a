"""The training loop: Muon or AdamW (optimizers.py), warmup then cosine or WSD (schedule.py), gradient
accumulation, bf16 autocast, evaluation, checkpoints with exact resume, and DistributedDataParallel or
FSDP under `torchrun`. What a run does beside that (the dropout schedule, the weight average, logs,
samples) are callbacks (callbacks.py).

One process or many run the same code. The global batch (`batch_size` sequences per optimizer step)
is fixed by the settings; each of the `world` processes computes `micro_batch_size` sequences per
forward pass, and gradients accumulate over `batch_size / (micro_batch_size * world)` passes. So the
same command gives the same optimisation whether it runs on one process or on eight.

The loop stops at the first limit reached (max_steps, max_tokens, epochs, time_budget), when asked to
(Ctrl-C or SIGTERM: it saves `last` first), or when the loss or the gradient norm stops being finite
(it keeps the last good checkpoint).

Host syncs: a step waits for the device once, to read its loss and gradient norm together, because a value
that is not finite must stop the run before the optimizer writes it into the weights. Under torchrun the
ranks also agree once a step on whether to stop. Logs, evaluations and checkpoints read the device only
at their own intervals.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import is_gptlab_checkpoint, read_config, with_tied_head, write_folder_atomically, write_model_files
from ..config import GPTConfig
from ..data import Batch
from ..model import GPTModel
from ..tokenizer import Tokenizer
from .averaging import WeightAverage
from .callbacks import IntervalLog, Samples, drop_metrics_after, progress_bar, record_metrics, show_progress
from .config import LIMITS, RunConfig, TrainConfig
from .data_record import write_record
from .dropout import DropoutSchedule, DropoutSwitch, describe_dropout
from .evaluation import EvalResult, autocast, loss_fn
from .fsdp import checkpoint_blocks, shard_model, unsharded_copy
from .optimizers import make_optimizer
from .runtime import (
    Runtime,
    TrainingError,
    agree_across_ranks,
    barrier,
    gather_rng_states,
    mean_across_ranks,
    set_rng_state,
    start_runtime,
    stop_runtime,
    with_training_dtype,
)
from .schedule import Plan, learning_rate
from .sources import TrainingData, TrainingSource
from .state import (
    RUN_MARKER,
    TrainerState,
    check_out_dir,
    link_or_copy_folder,
    load_model_weights,
    load_trainer_state,
    make_out_dir,
    save_checkpoint,
)
from .tracking import Tracker


def training_loss_fn(cfg: TrainConfig):
    """loss_fn, compiled with --compile: compiling the loss as well as the model lets inductor fuse the
    cast, log-softmax and cross-entropy, so the fp32 (B, T, V) logits are never materialised."""
    return torch.compile(loss_fn) if cfg.compile else loss_fn


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
class StepStats:
    loss: float  # the global batch's mean loss
    lr: float
    grad_norm: float  # before clipping


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


class Trainer:
    """One run: the model, its optimizer and state, set up from the settings (and from `last/` on resume).
    fit() runs the loop (step, evaluate, checkpoint) and calls the callbacks around it."""

    def __init__(
        self,
        runtime: Runtime,
        model_cfg: GPTConfig,
        cfg: TrainConfig,
        tokenizer: Tokenizer,
        data,
        resume: bool,
        overwrite: bool,
        init_state,
        run: RunConfig | None,
        hooks: ModelHooks,
        log,
    ):
        self.out_dir = out_dir = Path(cfg.out)
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
        self.runtime, self.cfg, self.tokenizer, self.run, self.hooks, self.log = (
            runtime,
            cfg,
            tokenizer,
            run,
            hooks,
            log,
        )
        self.resume = resume
        self.micro = cfg.micro_batch_size or max(1, cfg.batch_size // runtime.world)
        if cfg.batch_size % (self.micro * runtime.world):
            raise TrainingError(
                f"batch size {cfg.batch_size} is not a multiple of micro batch {self.micro} x {runtime.world} "
                "processes; choose --batch-size as a multiple of their product"
            )
        self.accum_steps = cfg.batch_size // (self.micro * runtime.world)
        context = model_cfg.context_length
        is_data = isinstance(data, TrainingData)
        self.source: TrainingSource = data.source(context, cfg.stride, cfg.eval_tokens, cfg.seed) if is_data else data
        self.plan = plan = Plan.of(cfg, cfg.batch_size * context, self.source.epoch_tokens)

        self.model = model = self.build_model(model_cfg, init_state)
        switch = DropoutSwitch(model)
        dropout_note = describe_dropout(cfg, switch, plan.epoch_tokens / plan.tokens_per_step)
        self.optimizer = make_optimizer(model, cfg)
        self.state = TrainerState()
        if resume:
            self.state = load_trainer_state(out_dir / "last", model, self.optimizer, hooks.read_model)
            if len(self.state.rng_states) == runtime.world:
                set_rng_state(runtime, self.state.rng_states[runtime.rank])
            elif runtime.is_main:
                log(
                    f"random state: the run was saved by {len(self.state.rng_states)} processes and resumes in "
                    f"{runtime.world}, so each starts from its seed again: random draws from here (dropout masks) "
                    "differ from an uninterrupted run"
                )
        self.average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
        if self.average and resume:
            self.average.resume(out_dir / "last")
        self.tracker = self.start_out_dir(data) if runtime.is_main else None
        if runtime.is_main:
            for line in plan.describe(cfg) + ([dropout_note] if dropout_note else []):
                log(line)
        self.net: torch.nn.Module = model  # FSDP shards the model itself; plain data parallelism wraps it
        if runtime.distributed and not cfg.fsdp:
            self.net = DistributedDataParallel(
                model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
            )
        self.compute_loss = training_loss_fn(cfg)
        self.bar = progress_bar(cfg, runtime)
        self.callbacks = [DropoutSchedule(switch), *([self.average] if self.average else []), IntervalLog()]
        self.callbacks += [Samples(cfg.sample_tokens)] if cfg.sample_tokens else []
        self.progress, self.last_eval = 0.0, None

    def build_model(self, model_cfg: GPTConfig, init_state) -> GPTModel:
        cfg, runtime = self.cfg, self.runtime
        torch.manual_seed(cfg.seed)  # the same initial weights in every process (FSDP keeps each one's slice)
        model = GPTModel(model_cfg).to(runtime.device)
        if runtime.rank:
            torch.manual_seed(cfg.seed + runtime.rank)  # but each its own dropout masks
        if init_state is not None:
            model.load_state_dict(with_tied_head(model_cfg, dict(init_state)))
        elif cfg.pos_init == "sinusoidal":  # a resumed run loads its trained table over this later
            model.init_sinusoidal_positions()
        model = self.hooks.prepare(model)
        if cfg.fsdp:
            if not runtime.distributed:
                raise TrainingError(
                    "--fsdp shards the model across processes; launch them with "
                    "torchrun --nproc_per_node N -m gptlab train ... --fsdp"
                )
            return shard_model(model, cfg.activation_checkpointing)
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        return model

    def start_out_dir(self, data) -> Tracker:
        """The run's folder (rank 0): its marker, run.toml, the data record, the metrics so far; the loggers."""
        out_dir, run, step = self.out_dir, self.run, self.state.step
        make_out_dir(out_dir)
        (out_dir / RUN_MARKER).write_text(json.dumps({"format": "gptlab-run"}) + "\n")
        if run is not None:
            (out_dir / "run.toml").write_text(run.to_toml())
        if not self.resume and getattr(data, "sources", None) is not None:
            write_record(out_dir, data.sources)
        if not self.resume:
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            drop_metrics_after(out_dir, step, self.log)
        settings = run.to_toml() if run is not None else ""
        return Tracker(out_dir, self.cfg.loggers, settings, step if self.resume else None, self.log)

    # ------------------------------------------------------------------------- the loop

    def fit(self) -> TrainResult:
        """Step until a limit or a signal stops the run, evaluating and saving every eval_interval steps."""
        self.start, resumed_at = time.perf_counter() - self.state.elapsed, self.state.step
        self.batches = self.source.batches(
            self.cfg.batch_size, self.cfg.seed, self.state.epoch, self.state.windows_in_epoch,
            self.runtime.rank, self.runtime.world,
        )  # fmt: skip
        self.model.train()
        with StopRequest() as stop:
            while (stopped_by := self.stop_reason(stop)) is None:
                for callback in self.callbacks:
                    callback.step_start(self)
                stats = self.step(next(self.batches))
                for callback in self.callbacks:
                    callback.step_end(self, stats)
                if self.state.step % self.cfg.eval_interval == 0:
                    self.evaluate(final=False)
        return self.finish(stopped_by, resumed_at)

    def stop_reason(self, stop: StopRequest) -> str | None:
        """Why the run stops before its next step (a limit, "interrupt", "terminate"), or None; sets progress."""
        elapsed = time.perf_counter() - self.start
        progress, limit = self.plan.progress(self.cfg, self.state, elapsed)
        # a host sync under torchrun (a stop decision): every rank leaves the loop at the same step
        self.progress, interrupted = agree_across_ranks(self.runtime, progress, stop.requested)
        show_progress(self.bar, self.progress, elapsed)
        if not (interrupted or self.progress >= 1.0):
            return None
        self.state.elapsed = elapsed  # what the time budget was measured against, so a resume sees it spent
        return ("terminate" if stop.signal == signal.SIGTERM else "interrupt") if interrupted else limit

    def step(self, batch: Batch) -> StepStats:
        """One optimizer step on this rank's rows of a global batch (micro * accum_steps, context)."""
        cfg, state, runtime, model = self.cfg, self.state, self.runtime, self.model
        lr = learning_rate(cfg, state.step, self.progress, self.plan.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = torch.from_numpy(batch.inputs).to(runtime.device), torch.from_numpy(batch.targets).to(runtime.device)
        loss_sum = torch.zeros((), device=runtime.device)
        for i, (xm, ym) in enumerate(zip(x.split(self.micro), y.split(self.micro))):
            last_micro = i == self.accum_steps - 1  # gradients are reduced across processes after it only
            if cfg.fsdp:
                model.set_requires_gradient_sync(last_micro)
            with nullcontext() if last_micro or self.net is model else self.net.no_sync():
                with autocast(runtime, cfg.dtype):
                    loss = self.compute_loss(self.net, xm, ym) / self.accum_steps
                loss.backward()
            loss_sum += loss.detach().float()
        loss_sum = mean_across_ranks(runtime, loss_sum)  # every rank sees a NaN anywhere
        # The norm is measured whether or not it is clipped (max_norm inf leaves the gradients as they are).
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        grad_norm = grad_norm.full_tensor() if cfg.fsdp else grad_norm  # FSDP: a norm over every shard
        # the step's host sync (a stop decision): a loss or norm that is not finite must not reach the weights
        loss_value, norm_value = torch.stack([loss_sum, grad_norm.float()]).tolist()
        if not math.isfinite(loss_value):
            raise divergence_error("loss", loss_value, state.step + 1, self.out_dir)
        if not math.isfinite(norm_value):
            raise divergence_error("gradient norm", norm_value, state.step + 1, self.out_dir)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += self.plan.tokens_per_step
        state.epoch, state.windows_in_epoch = batch.resume_at
        state.elapsed = time.perf_counter() - self.start
        return StepStats(loss_value, lr, norm_value)

    def evaluate(self, final: bool) -> EvalResult:
        """Score the validation data and save the checkpoint; with --ema-decay, both of the average."""
        cfg, state, runtime = self.cfg, self.state, self.runtime
        with self.average.in_model() if self.average else nullcontext():
            result = self.source.evaluate(self.net, self.micro, runtime, cfg.dtype)
            if not math.isfinite(result.loss):  # the last step broke the weights: keep them out of the checkpoints
                raise divergence_error("validation loss", result.loss, state.step, self.out_dir)
            improved = state.best_val_loss is None or result.loss < state.best_val_loss
            if improved:
                state.best_val_loss = result.loss
            state.rng_states = gather_rng_states(runtime)
            whole = unsharded_copy(self.model) if cfg.fsdp else self.model  # every rank takes part; rank 0 gets it
            self.checkpoint(improved, whole)
            if runtime.is_main:
                for callback in self.callbacks:
                    callback.evaluated(self, result, final, whole)
                self.hooks.after_eval(self.out_dir, state.step, result)
        self.last_eval = (state.step, result)
        return result

    def checkpoint(self, improved: bool, whole: GPTModel) -> None:
        """`last/` (every rank takes part under FSDP, rank 0 writes), and `best/` when the loss improved."""
        out_dir, args = self.out_dir, (self.model, self.tokenizer, self.optimizer, self.state, self.run)
        if self.cfg.fsdp:
            save_checkpoint(out_dir / "last", *args, self.hooks.write_model, whole)
        elif self.runtime.is_main:
            save_checkpoint(out_dir / "last", *args, self.hooks.write_model, average=self.average)
        if improved and self.runtime.is_main:
            write_folder_atomically(out_dir / "best", lambda folder: link_or_copy_folder(out_dir / "last", folder))

    def finish(self, stopped_by: str, resumed_at: int) -> TrainResult:
        """The final evaluation (unless the last step had one) and what the run says as it ends."""
        state, runtime, cfg, log = self.state, self.runtime, self.cfg, self.log
        self.bar.close()
        if self.resume and state.step == resumed_at and runtime.is_main:
            if stopped_by == "time_budget":
                log(
                    f"nothing to train: the run's time budget of {cfg.time_budget:g} s is spent "
                    f"({state.elapsed:.0f} s trained) and a run stops at whichever limit comes first; "
                    "to train on, resume with a larger --time-budget"
                )
            elif stopped_by not in ("interrupt", "terminate"):
                option = "--" + stopped_by.replace("_", "-")
                log(
                    f"nothing to train: the run's {option} is reached at step {state.step}; to train on, resume with a larger {option}"
                )
        last = self.last_eval
        final = last[1] if last and last[0] == state.step else self.evaluate(final=True)
        if getattr(self.source, "bounded", False):  # the in-run figures were estimates: the end scores everything
            with self.average.in_model() if self.average else nullcontext():
                final = self.source.evaluate_whole(self.net, self.micro, runtime, cfg.dtype)
            if runtime.is_main:
                metrics = {f"final_val_{name}": value for name, value in final.metrics().items()}
                self.record({"step": state.step, "tokens": state.tokens_seen, **metrics})
                self.say(f"step {state.step}: val on the whole split {final.format()}")
        if stopped_by in ("interrupt", "terminate") and runtime.is_main:
            what = "SIGTERM" if stopped_by == "terminate" else "Ctrl-C"
            log(
                f"stopped by {what} at step {state.step}; checkpoint saved in {self.out_dir / 'last'}; "
                f"continue with: gptlab train --out {self.out_dir} --resume"
            )
        if self.tracker is not None:
            self.tracker.close()
        barrier(runtime)  # no rank tears the process group down while another still uses it
        return TrainResult(state, final, self.out_dir, stopped_by, runtime.is_main)

    # ------------------------------------------------------------------------- output (rank 0)

    def record(self, values: dict) -> None:
        """A metrics record: metrics.jsonl, then the --logger targets."""
        record_metrics(self.out_dir, values)
        self.tracker.record(values)

    def say(self, line: str) -> None:
        """A log line on stdout that does not tear the progress bar on stderr."""
        if self.bar.disable:
            self.log(line)
        else:
            self.bar.write(line, file=sys.stdout)


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
        return Trainer(runtime, model_cfg, cfg, tokenizer, data, resume, overwrite, init_state, run, hooks, log).fit()
    finally:
        if own_runtime:
            stop_runtime(runtime)


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
