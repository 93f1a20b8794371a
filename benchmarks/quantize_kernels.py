"""Quantized matmul kernels on CPU, per GPT-2 124M matrix shape, against float32 F.linear.

For each Linear shape of GPT-2 124M and a few row counts (1 and 8: decoding at batch 1 and 8; 128: a
prefill or an evaluation batch), times y = x·Wᵀ + b with:

    fp32              F.linear, the weight as nn.Linear stores it [out, in] (the baseline of every ratio)
    fp32 packed       the weight packed once into oneDNN's layout, as gptlab's decoder runs it on the CPU
    bf16              F.linear, weight and activations in bfloat16
    bf16 packed       the same packing in bfloat16
    int8 wo bf16      torch._weight_int8pack_mm: int8 weights, per-channel scales, bfloat16 activations
    int8 wo fp32      the same kernel with float32 activations
    int8 dyn x86      PyTorch's dynamic int8 Linear (activations rounded to 8 bits per call), x86 engine
    int8 dyn onednn   the same op with weights prepacked by the oneDNN engine
    int4 gN bf16      torch._weight_int4pack_mm_for_cpu, groups of N = 32, 64, 128 inputs, bfloat16
                      activations (an earlier version of this script timed float32 ones too: 0.02-0.2x
                      float32 F.linear at 1 and 8 rows, and seconds per call of the head at 128)

Decoding streams every weight from memory once per step, and the whole model (500 MB in float32)
is far larger than the CPU's last-level cache, so before each timed call the script reads a buffer of
EVICT_BYTES that pushes the weight out of the cache. Kernels run interleaved round by round, so that
load from other processes hits them alike; the table reports the median over rounds (the JSON also
keeps the minimum). The quantized kernels are gptlab.inference.quantize's modules, and
Int8PackLinear below for the weight-only kernel it does not use. With float32 activations that
kernel is timed at decoding row counts only: at 8 rows it is already several times slower than
float32 F.linear, and at 128 rows a call of the head takes seconds.

Then decoding itself: tokens/s of gptlab's KV-cached decoder (generate_ids, greedy, a 32-token prompt,
DECODE_NEW_TOKENS new tokens, prefill included) on a GPT-2 124M-shape model with random weights (tied
head, qkv bias), at batch 1 and 8, in float32 and bfloat16 (the decoder's packed copies), and
quantize_model's int8 and int4, interleaved round by round.

    .venv/bin/python benchmarks/quantize_kernels.py [--threads 1] [--rows 1 8 128] [--rounds 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import machine_info, write_report
from torch import nn

from gptlab.config import get_config
from gptlab.inference.decoder import DecoderSettings
from gptlab.inference.generate import generate_ids
from gptlab.inference.kernels import PackedLinear
from gptlab.inference.quantize import (
    DynamicInt8Linear,
    Int4Linear,
    QuantizedLinear,
    quantize_model,
    quantize_rows,
)
from gptlab.inference.sampling import GenerationOptions
from gptlab.model import GPTModel

SHAPES = {  # name: (in_features, out_features, bias), as in GPT-2 124M
    "qkv": (768, 2304, True),
    "out_proj": (768, 768, True),
    "fc": (768, 3072, True),
    "proj": (3072, 768, True),
    "head": (768, 50257, False),
}
EVICT_BYTES = 64 * 2**20  # twice this machine's 32 MB L3
DECODE_ROWS = 8  # the float32-activation kernels are timed up to this many rows only
BASELINE = "fp32"
DECODE_PROMPT_TOKENS, DECODE_NEW_TOKENS = 32, 32


class Int8PackLinear(QuantizedLinear):
    """torch._weight_int8pack_mm, the kernel gpt-fast uses for int8 weight-only decoding: int8 weights
    with per-row scales, activations (and scales) in activation_dtype."""

    def __init__(self, linear: nn.Linear, activation_dtype: torch.dtype):
        super().__init__(linear)
        self.weight_int8, self.scales = quantize_rows(linear.weight, activation_dtype)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows.to(self.scales.dtype).contiguous(), self.weight_int8, self.scales)


def with_engine(engine: str, build: Callable[[], nn.Module]) -> nn.Module:
    """Build under a quantized engine (it decides the prepacked layout), then restore the default."""
    default = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        return build()
    finally:
        torch.backends.quantized.engine = default


def float_linear(linear: nn.Linear, dtype: torch.dtype, packed: bool = False) -> Callable:
    converted = copy.deepcopy(linear).to(dtype)
    product = PackedLinear(converted) if packed else converted
    return lambda x: product(x.to(dtype))


# name: (bits per weight, float32 activations, how to build one callable from an nn.Linear)
KERNELS: dict[str, tuple[int, bool, Callable[[nn.Linear], Callable]]] = {
    "fp32": (32, True, lambda linear: float_linear(linear, torch.float32)),
    "fp32 packed": (32, True, lambda linear: float_linear(linear, torch.float32, packed=True)),
    "bf16": (16, False, lambda linear: float_linear(linear, torch.bfloat16)),
    "bf16 packed": (16, False, lambda linear: float_linear(linear, torch.bfloat16, packed=True)),
    "int8 wo bf16": (8, False, lambda linear: Int8PackLinear(linear, torch.bfloat16)),
    "int8 wo fp32": (8, True, lambda linear: Int8PackLinear(linear, torch.float32)),
    "int8 dyn x86": (8, False, lambda linear: with_engine("x86", lambda: DynamicInt8Linear(linear))),
    "int8 dyn onednn": (8, False, lambda linear: with_engine("onednn", lambda: DynamicInt8Linear(linear))),
    "int4 g32 bf16": (4, False, lambda linear: Int4Linear(linear, 32)),
    "int4 g64 bf16": (4, False, lambda linear: Int4Linear(linear, 64)),
    "int4 g128 bf16": (4, False, lambda linear: Int4Linear(linear, 128)),
}
SLOW_AT_MANY_ROWS = {name for name, (bits, fp32_activations, _) in KERNELS.items() if bits < 16 and fp32_activations}


@torch.inference_mode()
def time_shape(in_features: int, out_features: int, bias: bool, rows: list[int], rounds: int) -> dict:
    """Milliseconds per call (median and minimum over rounds) of every kernel at every row count, for one shape."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.02)  # GPT-2's initialisation: the scales see realistic values
    kernels = {name: build(linear) for name, (_, _, build) in KERNELS.items()}
    evict = torch.ones(EVICT_BYTES // 4)
    results = {}
    for n_rows in rows:
        names = [name for name in KERNELS if n_rows <= DECODE_ROWS or name not in SLOW_AT_MANY_ROWS]
        x = torch.randn(n_rows, in_features)
        for name in names:  # warm-up: first-call allocations and lazy initialisation
            kernels[name](x)
        times = {name: [] for name in names}
        for round_index in range(rounds):
            for name in names if round_index % 2 == 0 else reversed(names):
                evict.sum()  # the weight leaves the cache, as the rest of the model would push it out
                start = time.perf_counter()
                kernels[name](x)
                times[name].append(time.perf_counter() - start)
        median_ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        results[n_rows] = {
            "ms": median_ms,
            "min_ms": {name: 1e3 * min(values) for name, values in times.items()},
            "ratio_vs_fp32": {name: median_ms[BASELINE] / ms for name, ms in median_ms.items()},
        }
    return results


def decoding_variants(seed: int = 0) -> tuple[dict, dict]:
    """name → (model, DecoderSettings) for the decoding comparison, and the seconds quantize_model took."""
    torch.manual_seed(seed)
    model = GPTModel(get_config("gpt2").replace(tie_embeddings=True, qkv_bias=True)).eval()
    variants = {"fp32": (model, DecoderSettings()), "bf16": (model, DecoderSettings(dtype=torch.bfloat16))}
    quantize_seconds = {}
    for mode in ("int8", "int4"):
        start = time.perf_counter()
        quantized = quantize_model(model, mode)
        quantize_seconds[mode] = time.perf_counter() - start
        # prepare_weights=False: decode with the quantized modules as they are, not a float copy of them
        variants[mode] = (quantized, DecoderSettings(prepare_weights=False))
    return variants, quantize_seconds


def time_decoding(rounds: int) -> dict:
    """tokens/s (median over rounds, prefill included) of each variant at batch 1 and 8."""
    variants, quantize_seconds = decoding_variants()
    vocab_size = next(iter(variants.values()))[0].cfg.vocab_size
    prompt = torch.randint(0, vocab_size, (DECODE_PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()
    options = GenerationOptions(max_new_tokens=DECODE_NEW_TOKENS, temperature=0)
    results = {"quantize_seconds": quantize_seconds}
    for batch in (1, 8):
        prompts = [prompt] * batch
        for model, settings in variants.values():  # warm-up; makes the decoder's float32 and bfloat16 copies once
            generate_ids(model, prompts, options.replace(max_new_tokens=2), settings=settings)
        rates = {name: [] for name in variants}
        for round_index in range(rounds):
            for name in variants if round_index % 2 == 0 else reversed(variants):
                model, settings = variants[name]
                start = time.perf_counter()
                generate_ids(model, prompts, options, settings=settings)
                rates[name].append(batch * DECODE_NEW_TOKENS / (time.perf_counter() - start))
        median = {name: statistics.median(values) for name, values in rates.items()}
        results[batch] = {
            "tokens_per_s": median,
            "per_round_tokens_per_s": rates,
            "ratio_vs_fp32": {name: rate / median[BASELINE] for name, rate in median.items()},
        }
    return results


def print_decoding(decoding: dict) -> None:
    print(
        f"decoding, GPT-2 124M shape, greedy, {DECODE_PROMPT_TOKENS}-token prompt, {DECODE_NEW_TOKENS} new tokens "
        "(tokens/s, prefill included; speed-up vs fp32):"
    )
    for batch in (1, 8):
        row = decoding[batch]
        print(
            f"  batch {batch}: "
            + "   ".join(
                f"{name} {rate:.1f} ({row['ratio_vs_fp32'][name]:.2f}x)" for name, rate in row["tokens_per_s"].items()
            )
        )
    print(
        "  quantize_model took "
        + ", ".join(f"{mode} {seconds:.1f} s" for mode, seconds in decoding["quantize_seconds"].items())
    )


def print_table(report: dict) -> None:
    names = list(KERNELS)
    print(
        f"ms per call (median of {report['rounds']}, weight evicted from the cache before each) and "
        f"speed-up vs fp32 F.linear [out,in]; {report['machine']['threads']} threads"
    )
    print(f"{'shape':<22}{'rows':>5}" + "".join(f"{name:>17}" for name in names))
    for shape, by_rows in report["shapes"].items():
        in_features, out_features, _ = SHAPES[shape]
        for n_rows, row in by_rows.items():
            cells = "".join(
                f"{row['ms'][name]:>9.3f} {row['ratio_vs_fp32'][name]:>5.2f}x" if name in row["ms"] else f"{'-':>16}"
                for name in names
            )
            print(f"{shape} {in_features}->{out_features:<10}"[:22].ljust(22) + f"{n_rows:>5}" + cells)
    print()
    print("fastest quantized kernel per shape and row count:")
    for shape, by_rows in report["shapes"].items():
        for n_rows, row in by_rows.items():
            for bits in (8, 4):
                candidates = [name for name in row["ms"] if KERNELS[name][0] == bits]
                best = min(candidates, key=row["ms"].get)
                print(
                    f"  {shape:<9} rows {n_rows:>3}  int{bits}: {best:<16} {row['ratio_vs_fp32'][best]:.2f}x fp32, "
                    f"{row['ms']['bf16'] / row['ms'][best]:.2f}x bf16"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128], help="rows of x per call")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decode-rounds", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads (1 on a shared machine: a second thread waits whenever another process holds a core)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantize_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = {
        "machine": machine_info(),
        "rounds": args.rounds,
        "evict_bytes": EVICT_BYTES,
        "baseline": BASELINE,
        "shapes": {shape: time_shape(*SHAPES[shape], args.rows, args.rounds) for shape in args.shapes},
    }
    print_table(report)
    report["decoding"] = time_decoding(args.decode_rounds)
    print()
    print_decoding(report["decoding"])
    report["seconds"] = time.perf_counter() - start
    print(f"({report['seconds']:.0f} s)")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
