"""What a run does beside optimising, as callbacks the loop (trainer.py) calls at three points: before a
step, after it, and after an evaluation (rank 0 only). The dropout schedule (dropout.py) and the weight
average (averaging.py) are callbacks too. Each gets the Trainer, and reads what it needs.

Below: the log of each interval, samples at each evaluation, and the files and progress bar they write.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..model import GPTModel
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .runtime import Runtime
from .state import read_log, write_log


class Callback:
    """The three points of the loop; each does nothing unless a subclass says otherwise."""

    def step_start(self, trainer) -> None:
        """Before the step's batch is drawn; trainer.progress is how far the run is."""

    def step_end(self, trainer, stats) -> None:
        """After the optimizer step: trainer.state counts it; stats has its loss, lr and gradient norm."""

    def evaluated(self, trainer, result, final: bool, model: GPTModel) -> None:
        """On rank 0, after an evaluation and its checkpoint; model is the whole model (FSDP: gathered)."""


class IntervalLog(Callback):
    """Every log_interval steps: a metrics record (metrics.jsonl, then the --logger targets), a log line,
    and the loss on the progress bar; after each evaluation, its record, line and loss plot."""

    def __init__(self):
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def step_end(self, trainer, stats) -> None:
        state = trainer.state
        self.window_tokens += trainer.plan.tokens_per_step
        if state.step % trainer.cfg.log_interval:
            return
        tokens_per_s = self.window_tokens / (time.perf_counter() - self.window_start)
        self.window_start, self.window_tokens = time.perf_counter(), 0
        if trainer.runtime.is_main:
            values = {
                "step": state.step,
                "tokens": state.tokens_seen,
                "train_loss": stats.loss,
                "lr": stats.lr,
                "grad_norm": stats.grad_norm,
                "tokens_per_s": tokens_per_s,
                "elapsed": state.elapsed,
            }
            trainer.record(values)
            trainer.say(format_log_line(values, trainer.plan.steps))
            trainer.bar.set_postfix_str(f"loss {stats.loss:.4f}, grad norm {stats.grad_norm:.2f}")

    def evaluated(self, trainer, result, final, model) -> None:
        state = trainer.state
        trainer.record(
            {"step": state.step, "tokens": state.tokens_seen, **{f"val_{k}": v for k, v in result.metrics().items()}}
        )
        plot_losses(trainer.out_dir)
        trainer.say(f"step {state.step}: val {result.format()}")


class Samples(Callback):
    """A short sample of text after each evaluation but the last (--sample-tokens), logged and tracked."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    def evaluated(self, trainer, result, final, model) -> None:
        if not final:
            sample = sample_text(model, trainer.tokenizer, self.tokens)
            trainer.say(f"sample: {sample!r}")
            trainer.tracker.text("sample", sample, trainer.state.step)


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
