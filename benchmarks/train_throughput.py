"""Training throughput: gptlab's GPTModel against transformers' GPT2LMHeadModel, same weights, same step.

Both models get GPT-2's shape at 6 layers × 384 dims × 6 heads, context 256, the 50257-token vocabulary,
dropout 0.0 (so both do exactly the same math and their first losses can be compared), batch 8, and
gptlab's training step from gptlab.train: loss_fn under autocast, backward, gradient clipping, AdamW from
make_optimizer (same hyperparameters and decay groups), zero_grad. The transformers weights are gptlab's,
converted with gptlab.interop. "gptlab compiled" runs the same step with loss_fn under torch.compile, so
the model and the 50257-way cross-entropy become one graph.

The machine is shared, so the contestants are timed alternately: a few warm-up steps each, then rounds in
which they take turns step by step; a round gives one median step time per contestant, the reported figure
is the median over rounds, and each speed-up is the median of the per-round ratios. The fastest single step
("best") shows what a quiet machine gives.

Model FLOPs utilisation compares the FLOPs a step needs with a matmul peak measured in the same run:
    FLOPs/token = 6·N + 12·n_layers·emb_dim·context
where N counts the weights that take part in matmuls (every Linear in the blocks, plus the output head),
6·N covers forward (2·N) and backward (4·N), and 12·L·C·T is attention's q·kᵀ and weights·v, also ×3 for
forward and backward.

    .venv/bin/python benchmarks/train_throughput.py [--steps N] [--rounds R] [--no-compile] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Callable

import torch
from common import machine_info, timed, write_report
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from gptlab.config import GPTConfig, get_config
from gptlab.hf_format import state_dict_to_hf
from gptlab.model import GPTModel
from gptlab.training.config import TrainConfig
from gptlab.training.evaluation import autocast, loss_fn
from gptlab.training.optimizers import make_optimizer
from gptlab.training.runtime import Runtime
from gptlab.training.trainer import training_loss_fn

BATCH_SIZE = 8
MODEL_CONFIG = get_config("gpt2-mini", vocab_size=50257, qkv_bias=True, tie_embeddings=True, drop_rate=0.0)
DTYPES = ("float32", "bfloat16")
BASELINE = "transformers"
MATMUL_SIZE = 2048
FLOPS_FORMULA = "FLOPs/token = 6*N + 12*n_layers*emb_dim*context, N = matmul weights (block Linears + output head)"
DEFAULT_OUT = Path(__file__).parent / "results" / "train_throughput.json"

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class LogitsOnly(nn.Module):
    """GPT2LMHeadModel returning bare logits, so gptlab's loss_fn and make_optimizer treat it like GPTModel."""

    def __init__(self, hf_model: GPT2LMHeadModel):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=ids, use_cache=False).logits


def transformers_twin(model: GPTModel) -> LogitsOnly:
    """transformers' GPT-2 of the same shape holding the same weights."""
    cfg = model.cfg
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.emb_dim,
        n_head=cfg.n_heads,
        n_layer=cfg.n_layers,
        resid_pdrop=cfg.drop_rate,
        embd_pdrop=cfg.drop_rate,
        attn_pdrop=cfg.drop_rate,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), cfg))
    return LogitsOnly(hf_model)


def gptlab_copy(model: GPTModel) -> GPTModel:
    """A second GPTModel with the same weights, so each contestant trains its own."""
    twin = GPTModel(model.cfg)
    twin.load_state_dict(model.state_dict())
    return twin


def build_contestants(cfg: GPTConfig, seed: int, compile_loss: bool) -> dict[str, tuple[nn.Module, LossFn]]:
    """Each contestant's own model (all starting from the same weights) and the loss function it trains with."""
    torch.manual_seed(seed)
    ours = GPTModel(cfg)
    contestants: dict[str, tuple[nn.Module, LossFn]] = {"gptlab": (ours, loss_fn)}
    if compile_loss:
        contestants["gptlab compiled"] = (gptlab_copy(ours), training_loss_fn(TrainConfig(max_steps=1, compile=True)))
    contestants[BASELINE] = (transformers_twin(ours), loss_fn)
    return contestants


def make_train_step(
    model: nn.Module, compute_loss: LossFn, train_cfg: TrainConfig, runtime: Runtime, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], float]:
    """One optimizer step of gptlab's training on a fixed batch; returns the loss."""
    model.train()
    optimizer = make_optimizer(model, train_cfg)

    def step() -> float:
        with autocast(runtime, train_cfg.dtype):
            loss = compute_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def interleaved_step_times(
    steps: dict[str, Callable[[], float]], rounds: int, steps_per_round: int, warmup: int
) -> dict[str, list[list[float]]]:
    """Seconds of every timed step, per contestant and round; within a round the contestants take turns
    step by step, so a burst of load from another process falls on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name in steps:
            times[name].append([])
        for _ in range(steps_per_round):
            for name, step in steps.items():
                times[name][-1].append(timed(step)[1])
    return times


def matmul_peak_flops(dtype: str, size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """FLOP/s of the fastest of a few size×size matmuls (2·size³ FLOPs each)."""
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    a @ b  # the first call pays for kernel selection and page faults
    return 2 * size**3 / min(timed(lambda: a @ b)[1] for _ in range(repeats))


def matmul_weights(model: GPTModel) -> int:
    """Weights multiplied in matmuls: each Linear counted once per use (the tied head is a matmul too)."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))


def flops_per_token(model: GPTModel) -> int:
    cfg = model.cfg
    return 6 * matmul_weights(model) + 12 * cfg.n_layers * cfg.emb_dim * cfg.context_length


def measure(dtype: str, rounds: int, steps_per_round: int, warmup: int, seed: int, compile_loss: bool) -> dict:
    """Interleaved step times of every contestant at one dtype, with tokens/s and speed-ups over transformers."""
    cfg = MODEL_CONFIG
    runtime = Runtime(torch.device("cpu"))
    train_cfg = TrainConfig(max_steps=warmup + rounds * steps_per_round, dtype=dtype)
    tokens = torch.randint(
        cfg.vocab_size, (BATCH_SIZE, cfg.context_length + 1), generator=torch.Generator().manual_seed(seed)
    )
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) inputs and next-token targets
    steps = {
        name: make_train_step(model, compute_loss, train_cfg, runtime, x, y)
        for name, (model, compute_loss) in build_contestants(cfg, seed, compile_loss).items()
    }
    first = {name: timed(step) for name, step in steps.items()}  # same weights and data: the losses agree
    step_times = interleaved_step_times(steps, rounds, steps_per_round, warmup - 1)
    per_round = {
        name: [statistics.median(round_times) for round_times in contestant_times]
        for name, contestant_times in step_times.items()
    }
    tokens_per_step = BATCH_SIZE * cfg.context_length
    results = {}
    for name, times in per_round.items():
        speedups = [baseline / ours for ours, baseline in zip(times, per_round[BASELINE])]
        results[name] = {
            "tokens_per_s": tokens_per_step / statistics.median(times),
            "best_tokens_per_s": tokens_per_step / min(min(round_times) for round_times in step_times[name]),
            "step_s": step_times[name],
            "speedup_over_transformers": statistics.median(speedups),
            "speedup_per_round": speedups,
            "first_loss": first[name][0],
            "first_step_s": first[name][1],  # includes torch.compile's compilation
        }
    return results


def print_table(report: dict) -> None:
    env = report["environment"]
    print(
        f"torch {env['torch']}, {env['threads']} threads, {env['cpu_capability']}, "
        f"load average at start {env['load_average'][0]:.1f}; batch {report['batch_size']} × context "
        f"{report['model_config']['context_length']}; {report['rounds']} rounds × {report['steps_per_round']} steps"
    )
    print(f"MFU: {report['flops_formula']}")
    print(
        f"     N = {report['matmul_weights']:,}, {report['flops_per_token'] / 1e6:.1f} MFLOPs/token, against a "
        f"{MATMUL_SIZE}² matmul peak of "
        + ", ".join(f"{dtype} {peak / 1e9:.0f} GFLOP/s" for dtype, peak in report["matmul_peak_flops"].items())
    )
    print(
        f"{'dtype':<9} {'model':<16} {'tokens/s':>9} {'best':>6} {'MFU':>6} {'first loss':>11}   "
        "vs transformers (per round)"
    )
    for dtype, results in report["results"].items():
        for name, row in results.items():
            ratios = ", ".join(f"{ratio:.2f}" for ratio in row["speedup_per_round"])
            speedup = "" if name == BASELINE else f"{row['speedup_over_transformers']:.2f}× ({ratios})"
            print(
                f"{dtype:<9} {name:<16} {row['tokens_per_s']:>9.0f} {row['best_tokens_per_s']:>6.0f} "
                f"{row['mfu']:>6.1%} {row['first_loss']:>11.5f}   {speedup}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contestant per round (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per dtype (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contestant first (default 2)")
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="leave out 'gptlab compiled' (saves about a minute of compilation)",
    )
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args()
    for name in ("steps", "rounds", "warmup"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")

    environment = machine_info()
    probe = GPTModel(MODEL_CONFIG)
    model_flops = flops_per_token(probe)
    peaks_before = {dtype: matmul_peak_flops(dtype) for dtype in DTYPES}
    results = {dtype: measure(dtype, args.rounds, args.steps, args.warmup, args.seed, args.compile) for dtype in DTYPES}
    # The best of two measurements, since another process may have slowed either.
    peaks = {dtype: max(peak, matmul_peak_flops(dtype)) for dtype, peak in peaks_before.items()}
    for dtype, contestants in results.items():
        for row in contestants.values():
            row["mfu"] = row["tokens_per_s"] * model_flops / peaks[dtype]

    report = {
        "benchmark": "train_throughput",
        "model_config": MODEL_CONFIG.to_dict(),
        "batch_size": BATCH_SIZE,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "step": "loss_fn under autocast, backward, clip_grad_norm_, AdamW from make_optimizer, zero_grad",
        "flops_formula": FLOPS_FORMULA,
        "matmul_weights": matmul_weights(probe),
        "flops_per_token": model_flops,
        "matmul_peak_flops": peaks,
        "results": results,
        "environment": environment,
        "load_average_at_end": os.getloadavg(),
    }
    print_table(report)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
