"""GPU check: GPT-2 124M training throughput and MFU on one CUDA device, exact resume there, and greedy
generation there against the CPU's.

1. Throughput. GPT-2 124M as OpenAI shipped it (tied head, qkv bias, vocabulary 50257, context 1024, no
   dropout) trains on random tokens with gptlab's own step: training_loss_fn compiled (model and
   cross-entropy in one graph) under bf16 autocast, backward, clip_grad_norm_, fused AdamW from
   make_optimizer, with TF32 on for what stays in fp32. tokens/s is over the timed steps after the warm-up
   (which pays for compilation). MFU = tokens/s × FLOPs/token / peak, with benchmarks/train_throughput.py's
   FLOPs/token (6·N + 12·n_layers·emb_dim·context) and two peaks: a bf16 matmul measured in this run and
   the datasheet's dense bf16 figure (989 TFLOP/s for H100 SXM and H200). If the micro-batch does not fit,
   it is halved until it does.
2. Resume. gptlab.training.trainer.train() trains a small model with dropout on the device; a second run
   of the same settings is stopped by SIGINT halfway (as Ctrl-C or a preempting scheduler would) and
   resumed with train(resume=True). The per-step losses of the two must agree: exactly on the CPU, to
   RESUME_TOLERANCE on CUDA, where some backward kernels (attention, embedding) add in a varying order.
3. Generation. A small random model generates greedily through the KV cache (past its context, so the
   cache also slides) on the device and on the CPU, in fp32 with TF32 off: the tokens must be equal.

    PYTHONPATH=src python3 benchmarks/gpu_check.py [--device cuda] [--steps 100] [--micro-batch 64] [--quick]

--quick uses tiny shapes (what tests/test_gpu_check.py runs on the CPU). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from common import write_report
from train_throughput import FLOPS_FORMULA, flops_per_token, matmul_weights

from gptlab.config import GPTConfig, get_config
from gptlab.inference.generate import generate
from gptlab.model import GPTModel
from gptlab.tokenizer import CharTokenizer
from gptlab.training.config import TrainConfig
from gptlab.training.evaluation import autocast
from gptlab.training.optimizers import make_optimizer
from gptlab.training.runtime import Runtime
from gptlab.training.sources import TrainingData
from gptlab.training.trainer import train, training_loss_fn

DEFAULT_OUT = Path(__file__).parent / "results" / "gpu_check.json"
GPT2_124M = get_config("gpt2", tie_embeddings=True, qkv_bias=True, drop_rate=0.0)
QUICK_MODEL = GPTConfig(vocab_size=256, context_length=64, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0)
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s, without sparsity), most specific name first.
DATASHEET_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
]
RESUME_TOLERANCE = 1e-3  # nats; a resume bug (data order, optimizer state, schedule, RNG) moves losses by far more
TOKENIZER = CharTokenizer("".join(chr(c) for c in range(33, 33 + 63)))  # 64 ids: a vocabulary for the checkpoints


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def datasheet_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in DATASHEET_BF16 if key in name), None)


def measured_matmul_peak(device: torch.device, size: int, repeats: int = 10) -> float:
    """FLOP/s of size×size bf16 matmuls (2·size³ FLOPs each): the best of three timings of `repeats` in a row."""
    a, b = (torch.randn(size, size, dtype=torch.bfloat16, device=device) for _ in range(2))
    a @ b  # the first call pays for kernel selection
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best


def measure_throughput(
    cfg: GPTConfig, device: torch.device, micro_batch: int, steps: int, warmup: int, compile_loss: bool
) -> dict:
    """tokens/s of gptlab's training step (one micro-batch per step) after `warmup` untimed steps."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = GPTModel(cfg).to(device).train()
    train_cfg = TrainConfig(batch_size=micro_batch, max_steps=warmup + steps, dtype="bfloat16", compile=compile_loss)
    runtime = Runtime(device)
    optimizer = make_optimizer(model, train_cfg)
    compute_loss = training_loss_fn(train_cfg)
    tokens = torch.randint(cfg.vocab_size, (4, micro_batch, cfg.context_length + 1), device=device)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]  # 4 × (inputs, targets), each (micro_batch, context)

    def step(index: int) -> torch.Tensor:
        x, y = batches[index % len(batches)]
        with autocast(runtime, train_cfg.dtype):
            loss = compute_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # no .item(): the host would wait for the device every step

    start = time.perf_counter()
    first_loss = step(0).item()
    for index in range(1, warmup):
        step(index)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [step(index) for index in range(steps)]
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {
        "micro_batch": micro_batch,
        "tokens_per_s": steps * micro_batch * cfg.context_length / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "warmup_s": warmup_s,
        "first_loss": first_loss,
        "last_loss": losses[-1].item(),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def throughput_that_fits(cfg: GPTConfig, device: torch.device, micro_batch: int, **kwargs) -> dict:
    """measure_throughput at the largest micro-batch, from `micro_batch` down by halves, that fits in memory."""
    while True:
        try:
            return measure_throughput(cfg, device, micro_batch, **kwargs)
        except torch.cuda.OutOfMemoryError:
            if micro_batch == 1:
                raise
            print(f"micro-batch {micro_batch} does not fit in memory; trying {micro_batch // 2}")
        gc.collect()  # the failed attempt's model and activations, before the next one allocates
        torch.cuda.empty_cache()
        torch.compiler.reset()  # else the next shape compiles as "dynamic batch", with slower kernels
        micro_batch //= 2


def learnable_tokens(count: int, vocab_size: int, seed: int) -> np.ndarray:
    """A noisy cycle: each token is (previous · 5 + 1) mod vocab 80% of the time, else random. A model learns
    it within a few steps, so every step's loss differs and a resume that got anything wrong shows."""
    rng = np.random.default_rng(seed)
    tokens = np.empty(count, dtype=np.uint16)
    noise = rng.integers(vocab_size, size=count)
    keep = rng.random(count) < 0.8
    tokens[0] = noise[0]
    for i in range(1, count):
        tokens[i] = (int(tokens[i - 1]) * 5 + 1) % vocab_size if keep[i] else noise[i]
    return tokens


def stop_after(step: int):
    """A `log` for train() that sends this process SIGINT once `step` is logged: train() then finishes the
    step, saves `last` and returns, exactly as after a Ctrl-C."""

    def log(line: str) -> None:
        logged = re.match(r"step ([\d,]+)\S* \| loss", line)  # a training step's line, not an evaluation's
        if logged and int(logged.group(1).replace(",", "")) == step:
            signal.raise_signal(signal.SIGINT)

    return log


def train_losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def check_resume(device: torch.device, steps: int, quick: bool) -> dict:
    """An uninterrupted train() against one stopped at steps // 2 and resumed: the same losses."""
    cfg = GPTConfig(
        vocab_size=TOKENIZER.vocab_size,
        context_length=32 if quick else 128,
        emb_dim=64 if quick else 256,
        n_heads=2 if quick else 4,
        n_layers=2 if quick else 4,
        drop_rate=0.1,
    )
    tokens = learnable_tokens(4_000 if quick else 200_000, cfg.vocab_size, seed=0)
    split = int(0.9 * len(tokens))
    data = TrainingData(tokens[:split], tokens[split:], val_bytes=len(tokens) - split)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:

        def settings(name: str) -> TrainConfig:
            return TrainConfig(
                out=str(Path(folder) / name),
                batch_size=8,
                micro_batch_size=4,
                stride=None,
                lr=3e-3,
                warmup_steps=2,
                max_steps=steps,
                eval_interval=steps,
                log_interval=1,
                sample_tokens=0,
                dtype="bfloat16",
                device=str(device),
                progress=False,
                seed=7,
            )

        train(cfg, settings("whole"), TOKENIZER, data, log=lambda line: None)
        first = train(cfg, settings("split"), TOKENIZER, data, log=stop_after(steps // 2))
        second = train(cfg, settings("split"), TOKENIZER, data, resume=True, log=lambda line: None)
        whole, split_run = train_losses(Path(folder) / "whole"), train_losses(Path(folder) / "split")
    same_steps = sorted(whole) == sorted(split_run) == list(range(1, steps + 1))
    max_diff = max(abs(whole[s] - split_run[s]) for s in whole) if same_steps else float("inf")
    interrupted = first.stopped_by == "interrupt" and first.state.step == steps // 2 and second.state.step == steps
    tolerance = 0.0 if device.type == "cpu" else RESUME_TOLERANCE
    return {
        "steps": steps,
        "interrupted_at": first.state.step,
        "stopped_by": first.stopped_by,
        "losses_whole": [whole[s] for s in sorted(whole)],
        "losses_resumed": [split_run[s] for s in sorted(split_run)],
        "max_abs_diff": max_diff,
        "exact": max_diff == 0.0,
        "tolerance": tolerance,
        "passed": interrupted and max_diff <= tolerance,
    }


@contextmanager
def full_fp32_matmuls():
    """TF32 off: generation compares fp32 logits across devices, and TF32's 10-bit mantissa could flip a near tie."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def check_generation(device: torch.device, new_tokens: int) -> dict:
    """Greedy tokens of a random model on `device` against the CPU's, through the KV cache and past the context."""
    cfg = GPTConfig(vocab_size=128, context_length=64, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    prompts = torch.randint(cfg.vocab_size, (2, 8))  # (B, T)
    cpu_ids = generate(model, prompts, new_tokens)
    with full_fp32_matmuls():
        device_ids = generate(model.to(device), prompts.to(device), new_tokens).cpu()
    differs = (cpu_ids != device_ids).nonzero()
    result = {
        "rows": len(prompts),
        "new_tokens": new_tokens,
        "context_length": cfg.context_length,
        "equal": not len(differs),
        "passed": not len(differs),
    }
    if len(differs):
        row, position = differs[0].tolist()
        with torch.no_grad():  # a near tie in the CPU's logits there would explain the difference
            logits = model.cpu()(cpu_ids[row : row + 1, max(0, position - cfg.context_length) : position])[0, -1]
        top = logits.topk(2).values
        result.update(first_difference={"row": row, "position": position, "cpu_top2_gap": (top[0] - top[1]).item()})
    return result


def environment(device: torch.device, name: str) -> dict:
    return {
        "torch": torch.__version__,
        "device": name,
        "cuda": torch.version.cuda,
        "capability": torch.cuda.get_device_capability(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }


def print_table(report: dict) -> None:
    run, env = report["throughput"], report["environment"]
    print(
        f"\n{report['model']} training on {env['device']} (torch {env['torch']}): micro-batch {run['micro_batch']} x "
        f"{report['model_config']['context_length']}, bf16 autocast, {'compiled' if report['compile'] else 'eager'}, "
        f"fused AdamW"
    )
    print(
        f"  {'tokens/s':<26}{run['tokens_per_s']:>12,.0f}   ({run['step_ms']:.1f} ms/step, "
        f"warm-up {run['warmup_s']:.0f} s)"
    )
    print(
        f"  {'MFU vs measured peak':<26}{run['mfu_measured']:>12.1%}   (bf16 {report['matmul_size']}^3 matmul: "
        f"{report['measured_peak_flops'] / 1e12:,.1f} TFLOP/s)"
    )
    if report["datasheet_peak_flops"]:
        print(
            f"  {'MFU vs datasheet peak':<26}{run['mfu_datasheet']:>12.1%}   "
            f"({report['datasheet_peak_flops'] / 1e12:,.0f} TFLOP/s dense bf16)"
        )
    resume, gen = report["resume"], report["generation"]
    verdict = {True: "pass", False: "FAIL"}
    print(
        f"  {'resume on ' + report['device']:<26}{verdict[resume['passed']]:>12}   ({resume['steps']} steps, "
        f"stopped at {resume['interrupted_at']}, max |loss diff| {resume['max_abs_diff']:.2e}, "
        f"{'exact' if resume['exact'] else 'not exact'})"
    )
    print(
        f"  {'greedy generation':<26}{verdict[gen['passed']]:>12}   ({gen['rows']} x {gen['new_tokens']} tokens, "
        f"{report['device']} vs cpu{'' if gen['equal'] else ': ' + json.dumps(gen['first_difference'])})"
    )


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--steps", type=int, help="timed training steps (default 100; 3 with --quick)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default 64: 35 GiB; 4 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a CPU test of the script")
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="GPT-2's 50257 by default; nanoGPT pads it to 50304, a multiple of 64, for faster output-head matmuls",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager training step")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; run on a CUDA machine or pass --device cpu")
    for name in ("steps", "micro_batch", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as training on CUDA does (gptlab.training.runtime)
        torch.backends.cudnn.allow_tf32 = True

    model_cfg = QUICK_MODEL if args.quick else GPT2_124M
    if args.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=args.vocab_size)
    micro_batch = args.micro_batch or (4 if args.quick else 64)
    steps = args.steps or (3 if args.quick else 100)
    matmul_size = 256 if args.quick else 8192
    name, datasheet = datasheet_peak(device)
    with torch.device("meta"):  # shapes only: nothing allocated
        probe = GPTModel(model_cfg)
    model_flops = flops_per_token(probe)
    peak = measured_matmul_peak(device, matmul_size)
    throughput = throughput_that_fits(
        model_cfg, device, micro_batch, steps=steps, warmup=2 if args.quick else 5, compile_loss=args.compile
    )
    peak = max(peak, measured_matmul_peak(device, matmul_size))  # the better of before and after: clocks vary
    throughput["mfu_measured"] = throughput["tokens_per_s"] * model_flops / peak
    throughput["mfu_datasheet"] = throughput["tokens_per_s"] * model_flops / datasheet if datasheet else None
    resume = check_resume(device, steps=4 if args.quick else 8, quick=args.quick)
    generation = check_generation(device, new_tokens=80 if args.quick else 200)

    report = {
        "benchmark": "gpu_check",
        "device": device.type,
        "model": "tiny (--quick)" if args.quick else "GPT-2 124M",
        "model_config": model_cfg.to_dict(),
        "compile": args.compile,
        "timed_steps": steps,
        "flops_formula": FLOPS_FORMULA,
        "matmul_weights": matmul_weights(probe),
        "flops_per_token": model_flops,
        "matmul_size": matmul_size,
        "measured_peak_flops": peak,
        "datasheet_peak_flops": datasheet,
        "throughput": throughput,
        "resume": resume,
        "generation": generation,
        "passed": resume["passed"] and generation["passed"],
        "environment": environment(device, name),
    }
    print_table(report)
    write_report(report, args.out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
