"""Time to quality: `gptlab train --time-budget 300` with the defaults on the embedded corpus, then
bits per byte on its held-out 10%.

The baseline, trained in the same run under the same budget, is the textbook recipe: the
textbook's small configuration (4 layers, 128 dims, context 128, dropout 0.1, GPT-2's initialisation),
character-level, non-overlapping windows (stride = context), lr 1e-3, batch 16.
Target: <= 1.50 bits/byte after 300 s on 2 CPU cores.

    .venv/bin/python benchmarks/time_to_quality.py [--budget 300] [--no-baseline] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import machine_info, write_report

from gptlab.cli import main as gptlab

TARGET_BITS_PER_BYTE = 1.50
BASELINE_ARGS = ["--model", "gpt2-micro", "--emb-dim", "128", "--n-layers", "4", "--n-heads", "4", "--context-length", "128",
                 "--drop-rate", "0.1", "--lr", "1e-3", "--batch-size", "16", "--warmup-steps", "100", "--stride", "128",
                 "--pos-init", "gpt2"]


def train_and_measure(out_dir: Path, budget: float, extra: list[str]) -> dict:
    start = time.perf_counter()
    code = gptlab(["train", "--out", str(out_dir), "--time-budget", str(budget), "--no-progress",
                   "--eval-interval", "1000000", "--sample-tokens", "0", *extra])
    if code != 0:
        raise SystemExit(f"gptlab train exited with {code}")
    wall = time.perf_counter() - start
    state = json.loads((out_dir / "last" / "trainer_state.json").read_text())["trainer"]
    final = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    return {"args": extra, "steps": state["step"], "tokens": state["tokens_seen"], "train_seconds": state["elapsed"],
            "wall_seconds": wall, "val_loss": final["val_loss"], "val_bits_per_byte": final["val_bits_per_byte"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds (default 300)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the textbook-recipe baseline")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "time_to_quality.json")
    args = parser.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["gptlab defaults"] = train_and_measure(Path(tmp) / "defaults", args.budget, [])
        if not args.no_baseline:
            runs["textbook recipe"] = train_and_measure(Path(tmp) / "baseline", args.budget, BASELINE_ARGS)

    print(f"\ntime to quality: {args.budget:.0f} s of training on the embedded corpus, {torch.get_num_threads()} threads")
    print(f"{'run':<18}{'steps':>8}{'tokens':>12}{'val loss':>10}{'bits/byte':>11}")
    for name, run in runs.items():
        print(f"{name:<18}{run['steps']:>8}{run['tokens']:>12,}{run['val_loss']:>10.4f}{run['val_bits_per_byte']:>11.4f}")
    ours = runs["gptlab defaults"]["val_bits_per_byte"]
    if "textbook recipe" in runs:
        print(f"ratio textbook recipe / gptlab defaults (bits per byte): {runs['textbook recipe']['val_bits_per_byte'] / ours:.3f}")
    print(f"target <= {TARGET_BITS_PER_BYTE}: {'met' if ours <= TARGET_BITS_PER_BYTE else 'not met'} ({ours:.4f})")

    write_report({"budget_seconds": args.budget, "machine": machine_info(), "target_bits_per_byte": TARGET_BITS_PER_BYTE,
                  "runs": runs}, args.out)


if __name__ == "__main__":
    main()
