"""Decoding speed on a GPU: gptlab eager and with the compiled (CUDA-graph) step, against transformers' `generate`.

GPT-2 124M shape with random weights shared with transformers' GPT2LMHeadModel, greedy, a 32-token
prompt, 128 new tokens, batch 1 and 8, all on the same device in the same run. Each side runs once
to warm up (for the compiled step that first run includes compilation, reported on its own), then
the timed runs are interleaved round by round; the table reports medians. It also checks that the
three give the same greedy tokens.

    python benchmarks/gpu_decode.py [--device cuda] [--dtype float32] [--out FILE]
    python benchmarks/gpu_decode.py --device cpu      # a tiny shape, to check the script without a GPU
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import transformers
from common import machine_info, timed, write_report
from generate_throughput import build_models, transformers_greedy

from gptlab.inference.decoder import DecoderSettings
from gptlab.inference.generate import GenerationOptions, generate_ids

PROMPT_TOKENS = 32
TINY = transformers.GPT2Config(
    vocab_size=1024, n_positions=256, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
)


def agreeing_tokens(ours: list[list[int]], theirs: list[list[int]]) -> int:
    """How many leading tokens every row has in common with the reference (all of them when equal)."""
    counts = []
    for row, reference in zip(ours, theirs):
        same = next((i for i, (a, b) in enumerate(zip(row, reference)) if a != b), min(len(row), len(reference)))
        counts.append(same)
    return min(counts)


def measure(device: torch.device, dtype: torch.dtype, shape: str, new_tokens: int, rounds: int) -> dict:
    model, hf_model = build_models(hf_config=TINY if shape == "tiny" else None)
    model, hf_model = model.to(device, dtype), hf_model.to(device, dtype)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    greedy = GenerationOptions(max_new_tokens=new_tokens, temperature=0)

    def synced(fn):
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result

    results = {}
    for batch in (1, 8):
        ids = prompt.repeat(batch, 1).to(device)  # (B, T)

        jobs = {
            "transformers": lambda: transformers_greedy(hf_model, ids, new_tokens),
            "gptlab eager": lambda: generate_ids(model, ids.tolist(), greedy),
            "gptlab compiled": lambda: generate_ids(
                model, ids.tolist(), greedy, settings=DecoderSettings(compile=True)
            ),
        }
        first_seconds = {name: timed(lambda: synced(job))[1] for name, job in jobs.items()}
        runs = {name: [] for name in jobs}
        outputs = {}
        for round_index in range(rounds):
            for name in list(jobs) if round_index % 2 == 0 else list(reversed(jobs)):
                outputs[name], seconds = timed(lambda: synced(jobs[name]))
                runs[name].append(batch * new_tokens / seconds)
        median = {name: statistics.median(rates) for name, rates in runs.items()}
        results[batch] = {
            "tokens_per_s": median,
            "per_round_tokens_per_s": runs,
            "first_run_seconds": first_seconds,  # the compiled one includes compilation and graph capture
            "ratio_eager_vs_transformers": median["gptlab eager"] / median["transformers"],
            "ratio_compiled_vs_transformers": median["gptlab compiled"] / median["transformers"],
            "ratio_compiled_vs_eager": median["gptlab compiled"] / median["gptlab eager"],
            "tokens_agreeing_with_transformers": {
                name: agreeing_tokens(outputs[name], outputs["transformers"])
                for name in ("gptlab eager", "gptlab compiled")
            },
            "compiled_equals_eager": outputs["gptlab compiled"] == outputs["gptlab eager"],
        }
    return results


def print_report(report: dict) -> None:
    print(
        f"{report['device_name']}, {report['shape']} shape, {report['dtype']}, random weights, greedy, "
        f"{PROMPT_TOKENS}-token prompt, {report['new_tokens']} new tokens, {report['rounds']} interleaved rounds (medians)"
    )
    print(
        f"{'batch':>5}  {'transformers':>12}  {'gptlab eager':>12}  {'ratio':>5}  {'gptlab compiled':>15}  {'ratio':>5}  "
        f"{'compile+1st run':>15}  {'same tokens (eager/compiled)':>28}"
    )
    for batch, row in report["results"].items():
        rate = row["tokens_per_s"]
        agree = row["tokens_agreeing_with_transformers"]
        same = "/".join(
            "yes" if agree[name] == report["new_tokens"] else f"first {agree[name]}"
            for name in ("gptlab eager", "gptlab compiled")
        )
        print(
            f"{batch:>5}  {rate['transformers']:>12.1f}  {rate['gptlab eager']:>12.1f}  "
            f"{row['ratio_eager_vs_transformers']:>5.2f}  {rate['gptlab compiled']:>15.1f}  "
            f"{row['ratio_compiled_vs_transformers']:>5.2f}  {row['first_run_seconds']['gptlab compiled']:>13.1f} s  "
            f"{same:>28}"
        )
    print("(tokens/s; ratios against transformers' generate on the same device)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script on a tiny shape")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_decode.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; pass --device cpu to check the script on a tiny shape")
    shape = "gpt2" if device.type == "cuda" else "tiny"
    report = {
        "machine": machine_info(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "shape": shape,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "results": measure(device, getattr(torch, args.dtype), shape, args.new_tokens, args.rounds),
    }
    print_report(report)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
