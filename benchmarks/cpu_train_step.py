"""The character model's training step on the CPU: three speed-ups against what they replaced, and the whole step.

1. Attention. Training under bf16 autocast hands attention bfloat16 queries, keys and values. PyTorch's
   fused CPU kernel (scaled_dot_product_attention) is much slower in bfloat16 than in float32 on short
   sequences, above all its backward pass, so gptlab.model.causal_attention casts them up on the CPU below
   FLOAT32_ATTENTION_BELOW tokens. Timed: one forward and backward pass on bfloat16 inputs, of the kernel
   in bfloat16 (the baseline), in float32 (cast up and back), and causal_attention (which picks one), at
       char model    the embedded corpus's default in round 3: batch 24, 4 heads of 32, context 128
       gpt2-mini     benchmarks/train_throughput.py's model: batch 8, 6 heads of 64, context 256
       gpt2 124M     batch 2, 12 heads of 64, context 1024
2. Muon. torch.optim.Muon (the baseline) orthogonalises one matrix at a time; gptlab's BatchedMuon runs
   the same arithmetic over equally shaped matrices at once. Timed: one optimizer step over the block
   matrices of gpt2-micro (the default: 4 layers, 128 dims) and gpt2-mini, with fixed random gradients.
3. Dropout. torch.nn.Dropout (the baseline) draws a Bernoulli sample per value; gptlab.model.Dropout
   compares 16 random bits per value with the rate. Timed: forward and backward at rate 0.1 on the char
   model's bfloat16 activations (24 x 128 x 128), which it drops 9 times per step.
4. The whole step of `gptlab train`'s round-3 default model (gpt2-micro, vocabulary 104, batch 24, context 128,
   bf16 autocast, clipping, Muon + AdamW), before (bfloat16 attention kernel, torch's Muon, nn.Dropout:
   the baseline) and now, with dropout off (a run's first 4 epochs) and at 0.1 (after them).
5. The dtype: that step now in float32 (the baseline) and under bf16 autocast, and what --dtype auto chose on
   this CPU (training/runtime.py: bfloat16 only where the CPU has bfloat16 arithmetic).

Contestants take turns call by call, in rounds; a figure is the median over rounds and a ratio the
median of the per-round ratios (baseline time / contestant time).

    .venv/bin/python benchmarks/cpu_train_step.py [--rounds 7] [--parts attention muon dropout step dtype] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine_info, write_report

import gptlab.model
from gptlab.config import get_config
from gptlab.model import FLOAT32_ATTENTION_BELOW, Dropout, GPTModel, causal_attention
from gptlab.training.config import TrainConfig
from gptlab.training.dropout import DropoutSwitch
from gptlab.training.evaluation import loss_fn
from gptlab.training.optimizers import BatchedMuon, MuonWithAdamW, adamw, is_hidden_matrix, make_optimizer
from gptlab.training.runtime import training_dtype

ATTENTION_SHAPES = {
    "char model": (24, 4, 128, 32),
    "gpt2-mini": (8, 6, 256, 64),
    "gpt2 124M": (2, 12, 1024, 64),
}  # (B, H, T, D)
MUON_MODELS = ("gpt2-micro", "gpt2-mini")
STEP_BATCH, STEP_VOCAB = 24, 104
DROPOUT_SHAPE, DROPOUT_RATE = (24, 128, 128), 0.1
DEFAULT_OUT = Path(__file__).parent / "results" / "cpu_train_step.json"


def race(contestants: dict[str, Callable[[], None]], rounds: int, calls: int) -> dict[str, dict]:
    """Seconds per call of each contestant, taking turns; the first is the baseline of every ratio."""
    for run in contestants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, run in contestants.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls)
    baseline = times[next(iter(contestants))]
    return {
        name: {
            "median_ms": 1e3 * statistics.median(seconds),
            "best_ms": 1e3 * min(seconds),
            "speedup_vs_baseline": statistics.median(b / s for b, s in zip(baseline, seconds)),
        }
        for name, seconds in times.items()
    }


def attention_rows(rounds: int) -> list[dict]:
    def forward_backward(attend, inputs, grad) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = attend(*inputs)
            out.backward(grad)

        return run

    def float32_kernel(q, k, v):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)

    kernels = {
        "bf16 kernel": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "float32 kernel": float32_kernel,
        "gptlab causal_attention": lambda q, k, v: causal_attention(q, k, v, dropout=0.0),
    }
    rows = []
    for shape_name, shape in ATTENTION_SHAPES.items():
        inputs = [torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        grad = torch.randn(shape, dtype=torch.bfloat16)
        results = race({name: forward_backward(kernel, inputs, grad) for name, kernel in kernels.items()}, rounds, 10)
        rows += [
            {"part": "attention", "case": shape_name, "shape_BHTD": shape, "contestant": name, **result}
            for name, result in results.items()
        ]
    return rows


def muon_rows(rounds: int) -> list[dict]:
    rows = []
    for preset in MUON_MODELS:
        model = GPTModel(get_config(preset, vocab_size=STEP_VOCAB))
        hidden = [p for n, p in model.named_parameters() if is_hidden_matrix(n, p)]
        for param in hidden:
            param.grad = torch.randn_like(param) * 0.01
        optimizers = {
            "torch.optim.Muon": torch.optim.Muon(hidden, lr=1e-4, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
            "gptlab BatchedMuon": BatchedMuon(hidden, lr=1e-4, weight_decay=0.1, momentum=0.95),
        }
        results = race({name: optimizer.step for name, optimizer in optimizers.items()}, rounds, 10)
        rows += [
            {"part": "muon", "case": f"{preset}: {len(hidden)} matrices", "contestant": name, **result}
            for name, result in results.items()
        ]
    return rows


def dropout_rows(rounds: int) -> list[dict]:
    x = torch.randn(DROPOUT_SHAPE, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(DROPOUT_SHAPE, dtype=torch.bfloat16)

    def forward_backward(dropout: torch.nn.Module) -> Callable[[], None]:
        return lambda: dropout.train()(x).backward(grad)

    results = race(
        {
            "torch.nn.Dropout": forward_backward(torch.nn.Dropout(DROPOUT_RATE)),
            "gptlab Dropout": forward_backward(Dropout(DROPOUT_RATE)),
        },
        rounds,
        20,
    )
    return [
        {
            "part": "dropout",
            "case": f"{DROPOUT_RATE} on {'x'.join(map(str, DROPOUT_SHAPE))} bf16",
            "contestant": name,
            **result,
        }
        for name, result in results.items()
    ]


def step_rows(rounds: int, dtypes_only: bool = False) -> list[dict]:
    cfg = get_config("gpt2-micro", vocab_size=STEP_VOCAB)
    x, y = (torch.randint(0, STEP_VOCAB, (STEP_BATCH, cfg.context_length)) for _ in range(2))

    def step(model, optimizer, float32_attention_below: int, bfloat16: bool = True) -> Callable[[], None]:
        def run() -> None:
            gptlab.model.FLOAT32_ATTENTION_BELOW = float32_attention_below
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                loss = loss_fn(model, x, y)
            loss.backward()
            loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    def before() -> tuple[GPTModel, Callable[[], None]]:
        torch.manual_seed(0)
        model = GPTModel(cfg)
        for module in model.modules():
            if isinstance(module, Dropout):
                module.__class__ = torch.nn.Dropout
        named = list(model.named_parameters())
        hidden = [p for n, p in named if is_hidden_matrix(n, p)]
        optimizer = MuonWithAdamW(
            torch.optim.Muon(hidden, lr=1e-4, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
            adamw([p for n, p in named if not is_hidden_matrix(n, p)], 1e-4, (0.9, 0.95), 0.1),
        )
        return model, step(model, optimizer, 0)

    def now(bfloat16: bool = True) -> tuple[GPTModel, Callable[[], None]]:
        torch.manual_seed(0)
        model = GPTModel(cfg)
        optimizer = make_optimizer(
            model, TrainConfig(optimizer="muon", lr=1e-4, weight_decay=0.1)
        )  # what gptlab train builds
        return model, step(model, optimizer, FLOAT32_ATTENTION_BELOW, bfloat16)

    rows = []
    if dtypes_only:  # part 5: the same step in float32 (the baseline) and under bf16 autocast, dropout off
        chosen = training_dtype("auto", torch.device("cpu"))[0]
        results = race({"float32": now(bfloat16=False)[1], "bf16 autocast": now()[1]}, rounds, 2)
        return [
            {"part": "dtype", "case": f"gpt2-micro; auto: {chosen}", "contestant": name, **result}
            for name, result in results.items()
        ]
    (before_model, before_step), (now_model, now_step) = before(), now()
    switches = [DropoutSwitch(before_model), DropoutSwitch(now_model)]
    try:
        for dropout in (False, True):
            for switch in switches:
                switch.set(dropout)
            results = race(
                {"before (bf16 attention, torch Muon, nn.Dropout)": before_step, "gptlab now": now_step}, rounds, 5
            )
            rows += [
                {
                    "part": "step",
                    "case": f"gpt2-micro, dropout {cfg.drop_rate if dropout else 0:g}",
                    "contestant": name,
                    **result,
                }
                for name, result in results.items()
            ]
    finally:
        gptlab.model.FLOAT32_ATTENTION_BELOW = FLOAT32_ATTENTION_BELOW
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--parts", nargs="+", choices=["attention", "muon", "dropout", "step", "dtype"])
    args = parser.parse_args()

    torch.manual_seed(0)
    parts = {
        "attention": attention_rows,
        "muon": muon_rows,
        "dropout": dropout_rows,
        "step": step_rows,
        "dtype": lambda rounds: step_rows(rounds, dtypes_only=True),
    }
    rows = [row for name in args.parts or parts for row in parts[name](args.rounds)]
    print(f"{torch.get_num_threads()} threads; ratio: the first contestant of each case (the baseline) / this one")
    print(f"{'part':10} {'case':26} {'contestant':48} {'median ms':>10} {'best ms':>9} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['part']:10} {row['case']:26} {row['contestant']:48} {row['median_ms']:10.2f} "
            f"{row['best_ms']:9.2f} {row['speedup_vs_baseline']:6.2f}x"
        )
    write_report(
        {
            "benchmark": "cpu_train_step",
            "machine": machine_info(),
            "rounds": args.rounds,
            "float32_attention_below": FLOAT32_ATTENTION_BELOW,
            "rows": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
