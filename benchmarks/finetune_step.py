"""One fine-tuning step: full fine-tune and LoRA rank 16 in gptlab (LoRA eager, with the frozen base in
bfloat16, and that with --compile), against transformers + PEFT doing the same LoRA step, at GPT-2 124M's
and gpt2-medium's shapes, context 256, batch 8.

Every contestant starts from the same random weights (transformers' are gptlab's, converted), adapts the
same projections (attention qkv and output, feed-forward in and out: PEFT's c_attn, attn.c_proj, c_fc,
mlp.c_proj) with rank 16 and alpha 16, and takes gptlab's training step from benchmarks/train_throughput.py:
loss_fn under bf16 autocast, backward, gradient clipping, AdamW over the trainable parameters, zero_grad.

Each contestant runs in a process of its own, so that its memory is its own: peak RSS is the process's
high-water mark over the timed steps only (reset through /proc/self/clear_refs once the model is built, so
building a model, and converting weights for transformers, are not counted). The contestants take turns,
one process each per round, in a rotating order, so a burst of load from another process falls on all of
them; the reported step time is the median over rounds of each round's median step, and the speed-up the
median of the per-round ratios to transformers + PEFT.

    .venv/bin/python benchmarks/finetune_step.py [--models gpt2 gpt2-medium] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import machine_info, timed, write_report
from train_throughput import make_train_step, transformers_twin

from gptlab.config import get_config
from gptlab.finetune.hooks import lower_frozen
from gptlab.finetune.lora import LoRAConfig, apply_lora
from gptlab.interop.peft import peft_target_modules
from gptlab.model import GPTModel
from gptlab.training.config import TrainConfig
from gptlab.training.runtime import Runtime
from gptlab.training.trainer import training_loss_fn

BATCH_SIZE, CONTEXT = 8, 256
LORA = LoRAConfig(rank=16, alpha=16, targets=("qkv", "out_proj", "fc", "proj"))
CONTESTANTS = (
    "gptlab full",
    "gptlab LoRA",
    "gptlab LoRA bf16 base",
    "gptlab LoRA bf16 base compiled",
    "transformers + PEFT LoRA",
)
BASELINE = "transformers + PEFT LoRA"
DEFAULT_OUT = Path(__file__).parent / "results" / "finetune_step.json"


def build(model_name: str, contestant: str, seed: int) -> torch.nn.Module:
    """The contestant's model, in training mode, only the parameters it trains left trainable."""
    cfg = get_config(model_name, context_length=CONTEXT, qkv_bias=True, tie_embeddings=True, drop_rate=0.0)
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    if contestant == BASELINE:
        import peft

        config = peft.LoraConfig(
            r=LORA.rank,
            lora_alpha=LORA.alpha,
            lora_dropout=0.0,
            fan_in_fan_out=True,
            target_modules=peft_target_modules(LORA),
        )
        twin = transformers_twin(model)
        twin.hf_model = peft.get_peft_model(twin.hf_model, config)
        return twin.train()
    if contestant != "gptlab full":
        apply_lora(model, LORA)
        lower_frozen(model, "bfloat16" if "bf16 base" in contestant else "float32")
    return model.train()


def memory_mib(field: str) -> float:
    """A /proc/self/status figure (VmRSS: now, VmHWM: the high-water mark) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_contestant(model_name: str, contestant: str, steps: int, warmup: int, seed: int) -> dict:
    """In this process: build, then time `steps` steps after `warmup` untimed ones; peak RSS over the steps."""
    model = build(model_name, contestant, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(50257, (BATCH_SIZE, CONTEXT + 1), generator=torch.Generator().manual_seed(seed))
    # --compile's loss: the model and the 50257-way cross-entropy in one graph (compiled in the warm-up step)
    train_cfg = TrainConfig(max_steps=1, dtype="bfloat16", compile=contestant.endswith("compiled"))
    step = make_train_step(
        model, training_loss_fn(train_cfg), train_cfg, Runtime(torch.device("cpu")), tokens[:, :-1], tokens[:, 1:]
    )
    gc.collect()
    rss_before = memory_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
    first_loss = step()
    for _ in range(warmup - 1):
        step()
    step_s = [timed(step)[1] for _ in range(steps)]
    return {
        "step_s": step_s,
        "first_loss": first_loss,
        "rss_before_mib": rss_before,
        "peak_rss_mib": memory_mib("VmHWM"),
        "trainable": trainable,
        "total": total,
    }


def measure(model_name: str, rounds: int, steps: int, warmup: int, seed: int, threads: int) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in CONTESTANTS}
    for round_index in range(rounds):
        order = CONTESTANTS[round_index % len(CONTESTANTS) :] + CONTESTANTS[: round_index % len(CONTESTANTS)]
        for contestant in order:
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    model_name,
                    contestant,
                    "--steps",
                    str(steps),
                    "--warmup",
                    str(warmup),
                    "--seed",
                    str(seed),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            )
            runs[contestant].append(json.loads(child.stdout.splitlines()[-1]))
            print(
                f"  {model_name} round {round_index + 1}: {contestant}: "
                f"{statistics.median(runs[contestant][-1]['step_s']):.2f} s/step",
                flush=True,
            )
    per_round = {
        name: [statistics.median(run["step_s"]) for run in contestant_runs] for name, contestant_runs in runs.items()
    }
    results = {}
    for name, contestant_runs in runs.items():
        results[name] = {
            "step_s": statistics.median(per_round[name]),
            "step_s_per_round": per_round[name],
            "speedup_over_peft": statistics.median(b / o for o, b in zip(per_round[name], per_round[BASELINE])),
            "peak_rss_mib": statistics.median(run["peak_rss_mib"] for run in contestant_runs),
            "rss_before_mib": statistics.median(run["rss_before_mib"] for run in contestant_runs),
            "trainable": contestant_runs[0]["trainable"],
            "total": contestant_runs[0]["total"],
            "first_loss": contestant_runs[0]["first_loss"],
        }
    return results


def print_table(report: dict) -> None:
    env = report["environment"]
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, {report['threads']} threads, "
        f"{env['cpu_capability']}, load average at start {env['load_average'][0]:.1f}; batch {BATCH_SIZE} x "
        f"context {CONTEXT}, bf16 autocast; {report['rounds']} rounds x {report['steps']} steps"
    )
    print(
        f"{'model':<12} {'contestant':<31} {'s/step':>7} {'vs PEFT':>8} {'peak RSS':>9} {'trainable':>12} "
        f"{'first loss':>10}"
    )
    for model_name, results in report["results"].items():
        for name, row in results.items():
            print(
                f"{model_name:<12} {name:<31} {row['step_s']:>7.2f} {row['speedup_over_peft']:>7.2f}x "
                f"{row['peak_rss_mib']:>6.0f} MiB {row['trainable']:>12,} {row['first_loss']:>10.5f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "gpt2-medium"], choices=["gpt2", "gpt2-medium"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contestant per round (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each contestant once per round (default 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads per contestant")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CONTESTANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("steps", "warmup", "rounds", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.child:
        print(json.dumps(run_contestant(*args.child, args.steps, args.warmup, args.seed)))
        return
    environment = machine_info()
    results = {
        name: measure(name, args.rounds, args.steps, args.warmup, args.seed, args.threads) for name in args.models
    }
    report = {
        "benchmark": "finetune_step",
        "batch_size": BATCH_SIZE,
        "context_length": CONTEXT,
        "lora": {"rank": LORA.rank, "alpha": LORA.alpha, "targets": list(LORA.targets)},
        "step": "loss_fn under bf16 autocast, backward, clip_grad_norm_, AdamW (trainable parameters), zero_grad",
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "results": results,
        "environment": environment,
        "load_average_at_end": os.getloadavg(),
    }
    print_table(report)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
