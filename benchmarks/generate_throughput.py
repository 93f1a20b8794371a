"""Generation speed on CPU: the public `gptlab.generate` against transformers' GPT-2 `generate`, same weights.

GPT-2 124M shape (a default transformers GPT2Config: qkv bias, tied head) with random weights, copied
into gptlab through gptlab.interop. Greedy, a 32-token prompt, 128 new tokens, batch 1 and batch 8.
gptlab.generate lays the weights out for decoding once per model (the first call; transformers keeps
its weights in that layout already); that one-off cost is measured and reported on its own, and the
timed calls reuse the layout, as every call after a model's first does. bfloat16 runs the same call
on a bfloat16 copy of the model, int8 and int4 on its quantized copies (int4 from the bfloat16 one), and
each precision's tokens/s is also given as a ratio to gptlab's float32 in the same rounds. Both run in the same process, interleaved round by round
(alternating which goes first), so that load from other processes hits both alike; the table reports
medians and the per-round spread.

    .venv/bin/python benchmarks/generate_throughput.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import transformers
from common import machine_info, timed, write_report

from gptlab.hf_format import config_from_hf, state_dict_from_hf
from gptlab.inference.decoder import Decoder, prepared_model
from gptlab.inference.generate import generate, generate_uncached
from gptlab.inference.kernels import kernel_for
from gptlab.inference.quantize import quantize_model
from gptlab.model import GPTModel

PROMPT_TOKENS = 32
POSITIONS = (32, 256, 512, 1000)


def build_models(
    seed: int = 0, hf_config: transformers.GPT2Config | None = None
) -> tuple[GPTModel, transformers.GPT2LMHeadModel]:
    """Random weights (GPT-2 124M's shape unless hf_config says otherwise), the same on both sides."""
    torch.manual_seed(seed)
    hf_config = hf_config or transformers.GPT2Config()
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.generation_config.eos_token_id = None  # neither side stops early: every run makes every token
    hf_model.generation_config.pad_token_id = 0
    cfg = config_from_hf(hf_config.to_dict())
    model = GPTModel(cfg)
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), cfg))
    return model.eval(), hf_model


@torch.inference_mode()
def transformers_greedy(hf_model: transformers.GPT2LMHeadModel, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """transformers' generate, greedy: the new ids of every row."""
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[:, ids.shape[1] :].tolist()


def throughput_rounds(models: dict, hf_model, prompt: torch.Tensor, new_tokens: int, rounds: int) -> dict:
    """tokens/s of gptlab.generate (each precision of `models`) and transformers, interleaved, at batch sizes 1
    and 8; each precision's ratio to gptlab's float32 in the same rounds."""
    results = {}
    for batch in (1, 8):
        ids = prompt.repeat(batch, 1)  # (B, T)
        same_tokens = True

        def job(precision):
            return lambda: generate(models[precision], ids, new_tokens)[:, ids.shape[1] :].tolist()

        jobs = {"transformers": lambda: transformers_greedy(hf_model, ids, new_tokens)}
        jobs.update({f"gptlab {precision}": job(precision) for precision in models})
        runs = {name: [] for name in jobs}
        for round_index in range(rounds):
            order = list(jobs) if round_index % 2 == 0 else list(reversed(jobs))
            outputs = {}
            for name in order:
                outputs[name], seconds = timed(jobs[name])
                runs[name].append(batch * new_tokens / seconds)
            same_tokens &= outputs["transformers"] == outputs["gptlab float32"]
        median = {name: statistics.median(values) for name, values in runs.items()}
        results[batch] = {
            "tokens_per_s": median,
            "per_round_tokens_per_s": runs,
            "ratio_float32_vs_transformers": median["gptlab float32"] / median["transformers"],
            "per_round_ratio": [ours / theirs for ours, theirs in zip(runs["gptlab float32"], runs["transformers"])],
            "same_tokens_as_transformers": same_tokens,
            "ratio_vs_float32": {
                precision: median[f"gptlab {precision}"] / median["gptlab float32"] for precision in models
            },
            "per_round_ratio_vs_float32": {
                precision: [ours / base for ours, base in zip(runs[f"gptlab {precision}"], runs["gptlab float32"])]
                for precision in models
            },
        }
    return results


@torch.inference_mode()
def prefill_rates(model: GPTModel, prompt: torch.Tensor, repeats: int) -> dict:
    """Prompt tokens/s of the prefill pass (the model's decoding layout and the session's cache made beforehand)."""
    rates = {}
    for batch in (1, 8):
        decoder = Decoder(model, batch)
        rows = prompt.repeat(batch, 1).tolist()
        seconds = min(timed(lambda: decoder.prefill(rows))[1] for _ in range(repeats))
        rates[batch] = batch * prompt.shape[1] / seconds
    return rates


@torch.inference_mode()
def per_token_times(model: GPTModel, steps: int) -> dict:
    """Milliseconds for one more token at several positions (batch 1): cached step vs the textbook loop's step."""
    times = {}
    decoder = Decoder(model, 1)
    for position in POSITIONS:
        ids = torch.randint(0, model.cfg.vocab_size, (1, position))
        next_id = decoder.prefill(ids.tolist()).argmax(dim=-1)
        cached = []
        for _ in range(steps):
            logits, seconds = timed(lambda: decoder.step(next_id))
            next_id = logits.argmax(dim=-1)
            cached.append(seconds)
        uncached = [timed(lambda: generate_uncached(model, ids, 1))[1] for _ in range(max(1, steps // 4))]
        times[position] = {
            "cached_ms": 1e3 * statistics.median(cached),
            "uncached_ms": 1e3 * statistics.median(uncached),
        }
    return times


def print_report(report: dict) -> None:
    print(
        f"GPT-2 124M shape, random weights, greedy, {PROMPT_TOKENS}-token prompt, {report['new_tokens']} new tokens; "
        f"{report['machine']['threads']} threads, {report['rounds']} interleaved rounds (medians; spread in the JSON)"
    )
    print(f"float32 decoding layout, made once per model by the first call: {report['prepare_seconds']:.2f} s")
    for dtype, shapes in report["kernels"].items():
        print(
            f"{dtype} kernels (inference/kernels.py): "
            + ", ".join(f"{shape} {row['kernel']}" for shape, row in shapes.items())
        )
    print()
    print("gptlab.generate against transformers' generate:")
    print(
        f"{'batch':>5}  {'transformers':>12}  {'gptlab fp32':>11}  {'ratio':>5}  {'(per round)':>11}  "
        f"{'same tokens':>11}"
    )
    for batch, row in report["throughput"].items():
        rate = row["tokens_per_s"]
        spread = f"{min(row['per_round_ratio']):.2f}-{max(row['per_round_ratio']):.2f}"
        print(
            f"{batch:>5}  {rate['transformers']:>12.1f}  {rate['gptlab float32']:>11.1f}  "
            f"{row['ratio_float32_vs_transformers']:>5.2f}  {spread:>11}  "
            f"{'yes' if row['same_tokens_as_transformers'] else 'NO':>11}"
        )
    print("(tokens/s)")
    print()
    precisions = [name for name in next(iter(report["throughput"].values()))["ratio_vs_float32"] if name != "float32"]
    print("each precision against gptlab's float32, same rounds: tokens/s (ratio, per round)")
    print(f"{'batch':>5}  " + "  ".join(f"{name:>24}" for name in precisions))
    for batch, row in report["throughput"].items():
        cells = []
        for name in precisions:
            rounds = row["per_round_ratio_vs_float32"][name]
            cells.append(
                f"{row['tokens_per_s'][f'gptlab {name}']:.1f} ({row['ratio_vs_float32'][name]:.2f}x, "
                f"{min(rounds):.2f}-{max(rounds):.2f})"
            )
        print(f"{batch:>5}  " + "  ".join(f"{cell:>24}" for cell in cells))
    print()
    print(
        "prefill, float32: "
        + ", ".join(
            f"batch {batch}: {rate:.0f} prompt tokens/s" for batch, rate in report["prefill_tokens_per_s"].items()
        )
    )
    print()
    print(f"{'position':>8}  {'cached ms/token':>15}  {'textbook uncached ms/token':>26}")
    for position, row in report["ms_per_token_by_position"].items():
        print(f"{position:>8}  {row['cached_ms']:>15.1f}  {row['uncached_ms']:>26.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, 32 new tokens, fewer timed steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generate_throughput.json")
    args = parser.parse_args()
    new_tokens, rounds, steps = (32, 1, 4) if args.quick else (128, 3, 16)

    model, hf_model = build_models()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    bfloat16 = copy.deepcopy(model).to(torch.bfloat16)
    models = {
        "float32": model,
        "bfloat16": bfloat16,
        "int8": quantize_model(model, "int8"),
        "int4": quantize_model(bfloat16, "int4"),
    }
    _, prepare_seconds = timed(lambda: prepared_model(model))  # kept with the model: the timed calls reuse it
    report = {
        "machine": machine_info(),
        "kernels": {dtype: kernel_for(getattr(torch, dtype)) for dtype in ("float32", "bfloat16")},
        "new_tokens": new_tokens,
        "rounds": rounds,
        "prepare_seconds": prepare_seconds,
        "throughput": throughput_rounds(models, hf_model, prompt, new_tokens, rounds),
        "prefill_tokens_per_s": prefill_rates(model, prompt, repeats=3 if args.quick else 10),
        "ms_per_token_by_position": per_token_times(model, steps),
    }
    print_report(report)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
