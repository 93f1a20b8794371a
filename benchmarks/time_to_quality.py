"""Time to quality: held-out bits per byte on the embedded corpus after a fixed training time, for gptlab's
defaults against nanoGPT's CPU recipe run by gptlab's own trainer, at 150, 300 and 600 s.

nanoGPT's recipe (config/train_shakespeare_char.py with its README's CPU flags): characters, 4 layers,
4 heads, 128 dims, context 64, batch 12, no dropout, biases on, tied head, lr 1e-3 with 100 warmup
steps and cosine to 1e-4 at the end, AdamW betas 0.9/0.99, weight decay 0.1, gradient clipping 1.0,
float32; a stride of 1 stands in for its batches drawn at random offsets. Every run is evaluated by
gptlab on the whole held-out 10% in non-overlapping windows of its own context.

The 150 s column stands in for a machine half as fast as this one, 600 s for one twice as fast. For
scale, classic compressors: the size of (training text + held-out text) compressed, minus the training
text compressed alone, in bits per held-out byte (bzip2 and xz/LZMA from the standard library).

Extra rows (levers, `--lever NAME "ARGS"`, repeatable) run at --lever-budget only; `--budgets` with no value
runs the levers alone.
Target (issue 10): defaults / nanoGPT recipe >= 1.10 at every budget (the ratio is nanoGPT's bits per
byte over the defaults'), and <= 1.50 bits/byte at 300 s.

    .venv/bin/python benchmarks/time_to_quality.py [--budgets 150 300 600] [--lever NAME "ARGS"] [--out FILE]
"""

from __future__ import annotations

import argparse
import bz2
import json
import lzma
import shlex
import tempfile
import time
from pathlib import Path

from common import machine_info, write_report

from gptlab.cli import main as gptlab
from gptlab.data.corpus import default_corpus_text, split_text

TARGET_BITS_PER_BYTE, TARGET_RATIO = 1.50, 1.10
NANOGPT_RECIPE = (
    "--tokenizer char --model gpt2-micro --n-layers 4 --n-heads 4 --emb-dim 128 --context-length 64 "
    "--batch-size 12 --drop-rate 0 --attn-drop-rate 0 --qkv-bias --tie-embeddings --pos-init gpt2 "
    "--lr 1e-3 --warmup-steps 100 --min-lr-ratio 0.1 --beta1 0.9 --beta2 0.99 --weight-decay 0.1 "
    "--grad-clip 1.0 --dtype float32 --stride 1 --optimizer adamw --ema-decay 0"
)


def compressor_bits_per_byte() -> dict[str, float]:
    train, held_out = (part.encode() for part in split_text(default_corpus_text()))
    compressors = {
        "bzip2 -9": lambda data: bz2.compress(data, 9),
        "xz -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
    }
    return {
        name: 8 * (len(compress(train + held_out)) - len(compress(train))) / len(held_out)
        for name, compress in compressors.items()
    }


def train_and_measure(out_dir: Path, budget: float, args: list[str]) -> dict:
    start = time.perf_counter()
    code = gptlab(
        [
            "train",
            "--out",
            str(out_dir),
            "--time-budget",
            str(budget),
            "--no-progress",
            "--eval-interval",
            "1000000",
            "--sample-tokens",
            "0",
            *args,
        ]
    )
    if code != 0:
        raise SystemExit(f"gptlab train {shlex.join(args)} exited with {code}")
    state = json.loads((out_dir / "last" / "trainer_state.json").read_text())["trainer"]
    final = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][
        -1
    ]
    return {
        "args": shlex.join(args),
        "budget_seconds": budget,
        "steps": state["step"],
        "tokens": state["tokens_seen"],
        "train_seconds": state["elapsed"],
        "wall_seconds": time.perf_counter() - start,
        "val_bits_per_byte": final["val_bits_per_byte"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="*",
        default=[150.0, 300.0, 600.0],
        help="budgets for the defaults and nanoGPT's recipe; none (`--budgets` alone): the levers only",
    )
    parser.add_argument(
        "--lever",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "ARGS"),
        help="an extra row: gptlab train arguments added to the defaults, run at --lever-budget",
    )
    parser.add_argument("--lever-budget", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "time_to_quality.json")
    args = parser.parse_args()

    compressors = compressor_bits_per_byte()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            for name, recipe in (("gptlab defaults", ""), ("nanoGPT recipe", NANOGPT_RECIPE)):
                run = train_and_measure(Path(tmp) / f"{len(runs)}", budget, shlex.split(recipe))
                runs.append({"name": name, **run})
                print(f"{name} at {budget:.0f} s: {run['val_bits_per_byte']:.4f} bits/byte", flush=True)
        for name, extra in args.lever:
            run = train_and_measure(Path(tmp) / f"{len(runs)}", args.lever_budget, shlex.split(extra))
            runs.append({"name": name, **run})
            print(f"{name} at {args.lever_budget:.0f} s: {run['val_bits_per_byte']:.4f} bits/byte", flush=True)

    def score(name: str, budget: float) -> float | None:
        return next(
            (run["val_bits_per_byte"] for run in runs if run["name"] == name and run["budget_seconds"] == budget), None
        )

    ratios = {budget: score("nanoGPT recipe", budget) / score("gptlab defaults", budget) for budget in args.budgets}
    print(f"\nheld-out bits per byte on the embedded corpus ({machine_info()['threads']} threads)")
    print(f"{'run':<28}{'budget':>8}{'steps':>8}{'tokens':>12}{'bits/byte':>11}")
    for run in runs:
        print(
            f"{run['name']:<28}{run['budget_seconds']:>7.0f}s{run['steps']:>8}{run['tokens']:>12,}{run['val_bits_per_byte']:>11.4f}"
        )
    for budget, ratio in ratios.items():
        print(
            f"ratio nanoGPT / defaults at {budget:.0f} s: {ratio:.3f} ({'met' if ratio >= TARGET_RATIO else 'not met'}: "
            f">= {TARGET_RATIO})"
        )
    print(
        "compressors, bits per held-out byte: "
        + ", ".join(f"{name} {value:.3f}" for name, value in compressors.items())
    )
    write_report(
        {
            "machine": machine_info(),
            "targets": {"bits_per_byte_at_300s": TARGET_BITS_PER_BYTE, "ratio": TARGET_RATIO},
            "compressors_bits_per_byte": compressors,
            "ratios": ratios,
            "runs": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
