"""CPU decoding against llama.cpp: gptlab at each precision vs llama.cpp at the same precision, same weights.

GPT-2 124M shape (a default transformers GPT2Config: qkv bias, tied head) with random weights
(generate_throughput.build_models). gptlab decodes them in fp32, bf16, and quantize_model's int8 and
int4; llama.cpp (llama-cpp-python) runs the same model exported by gptlab's own GGUF exporter
(interop/gguf.py) as f32, bf16, q8_0 and q4_0 (every matrix); transformers' fp32 `generate` is the second baseline. Greedy,
a 32-token prompt, 128 new tokens (32 with --quick). End-of-text is just another token here (it can come up with
random weights): llama.cpp's `generate` never stops by itself, gptlab is given no eot_id and
transformers no eos_token_id.

Decode tokens/s counts the steps after the first new token: the prompt's pass (prefill) and the
first token are left out of the clock on every side (transformers: from its first call for scores).
Batch 1 runs llama.cpp through the binding's `Llama.generate`; batch 8 through the C API, one sequence
per row in one llama_batch (LlamaCppRows), since `Llama` decodes a single sequence. llama.cpp keeps the
binding's defaults otherwise (flash attention off, an f16 KV cache). Prefill tokens/s is one pass over a
prompt of each of PREFILL_LENGTHS tokens, at batch 1.

Roofline: at batch 1 each step reads every weight once, so tokens/s can be at most memory bandwidth /
bytes of weights per token. Bandwidth is measured in the same run (memory_bandwidth), and a
contestant's share is tokens/s x weight bytes / bandwidth. Weight bytes count every matrix multiplied
(the 48 linear layers and the output head, as each contestant stores them: an int8, int4, q8_0 or q4_0
matrix with its scales), its bias and the LayerNorms; the embedding lookups read one row each and are not
counted, nor is the KV cache (under 3% of the weights at these lengths in fp32).

The products alone: each gptlab precision's 49 matrix products are also timed by themselves, each on one
row, in a step's order and with the decoding copy's kernels (product_seconds). A step can go no faster, so
1 / that time over llama.cpp's rate bounds the ratio gptlab could reach with its kernels as they are.

Contestants run interleaved round by round (the order reversed every other round), so that load
from other processes hits them alike; tables report medians, the JSON every round.

    make bench-llama        (installs the `bench` extra, then runs this)
    .venv/bin/python benchmarks/llama_cpp_compare.py [--quick] [--rounds 5] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from torch import nn

try:
    import llama_cpp
    from llama_cpp import _internals as llama_internals
except ImportError:
    sys.exit("llama_cpp is not installed: run `make bench-llama` (it installs the `bench` extra, llama-cpp-python)")

from common import machine_info, timed, write_report
from generate_throughput import build_models

from gptlab.inference.decoder import Decoder, DecoderSettings, prepared_model
from gptlab.inference.generate import decode_steps
from gptlab.inference.quantize import DynamicInt8Linear, quantize_model
from gptlab.inference.sampling import GenerationOptions
from gptlab.interop.gguf import export_gguf
from gptlab.model import GPTModel
from gptlab.tokenizer import load_tokenizer

PROMPT_TOKENS = 32
PREFILL_LENGTHS = (32, 512)
BANDWIDTH_BYTES = 512 * 2**20  # 16x this machine's 32 MB L3
TARGET = 1.0  # issue 28: batch-1 decode at least as fast as llama.cpp at every precision
PRODUCTS = ("att.qkv", "att.out_proj", "ff.fc", "ff.proj")  # with out_head: the 49 products of a step
CONTEXT_GRANULE = 256  # llama.cpp rounds each sequence's context up to a multiple of this
# precision → (gptlab contestant, llama.cpp contestant at the same precision)
PAIRS = {
    "fp32": ("gptlab fp32", "llama.cpp f32"),
    "bf16": ("gptlab bf16", "llama.cpp bf16"),
    "int8": ("gptlab int8", "llama.cpp q8_0"),
    "int4": ("gptlab int4", "llama.cpp q4_0"),
}
GGUF_TYPES = {"llama.cpp f32": "f32", "llama.cpp bf16": "bf16", "llama.cpp q8_0": "q8_0", "llama.cpp q4_0": "q4_0"}
BATCH8 = ("gptlab fp32", "gptlab bf16", "gptlab int8", *GGUF_TYPES, "transformers fp32")

# (prompts, new tokens) → (each row's new ids, seconds of the steps after the first new token)
DecodeRun = Callable[[list[list[int]], int], tuple[list[list[int]], float]]


def gptlab_decode(model: GPTModel, settings: DecoderSettings) -> DecodeRun:
    def run(prompts, new_tokens):
        steps = decode_steps(model, prompts, GenerationOptions(max_new_tokens=new_tokens, temperature=0.0), settings)
        columns = [[token.id for token in next(steps)]]  # prefill and the first new token, not timed
        start = time.perf_counter()
        columns += [[token.id for token in tokens] for tokens in steps]
        return [list(row) for row in zip(*columns)], time.perf_counter() - start

    return run


class FirstScoresClock(transformers.LogitsProcessor):
    """Notes when generate first asks for scores: the prompt has been run by then."""

    def __init__(self):
        self.time = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.time = self.time or time.perf_counter()
        return scores


def transformers_decode(hf_model: transformers.GPT2LMHeadModel) -> DecodeRun:
    def run(prompts, new_tokens):
        ids = torch.tensor(prompts)  # (B, T)
        clock = FirstScoresClock()
        with torch.inference_mode():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=transformers.LogitsProcessorList([clock]),
            )
        return out[:, ids.shape[1] :].tolist(), time.perf_counter() - clock.time

    return run


def llama_cpp_decode(llm: llama_cpp.Llama) -> DecodeRun:
    """Batch 1 through the binding's own loop: Llama.generate evaluates each token and samples the next."""

    def run(prompts, new_tokens):
        (prompt,) = prompts
        llm.reset()  # otherwise generate reuses the cached prompt
        stream = llm.generate(prompt, temp=0.0)  # greedy
        ids = [next(stream)]
        start = time.perf_counter()
        ids += [next(stream) for _ in range(new_tokens - 1)]
        seconds = time.perf_counter() - start
        stream.close()
        return [ids], seconds

    return run


class LlamaCppRows:
    """Greedy decoding of several rows in one llama.cpp context, one sequence per row, all rows' tokens in
    one llama_batch per step (through the C API: the binding's Llama object decodes a single sequence)."""

    def __init__(self, llm: llama_cpp.Llama, rows: int, tokens_per_row: int):
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)  # threads, attention as llm's
        params.n_seq_max = rows
        params.n_ctx = rows * CONTEXT_GRANULE * -(-tokens_per_row // CONTEXT_GRANULE)
        params.n_batch = params.n_ubatch = max(params.n_batch, rows * PROMPT_TOKENS)
        self.context = llama_internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.batch = llama_internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_vocab = llm.n_vocab()

    def next_ids(self, rows: list[list[int]], start: int) -> list[int]:
        """Run each row's tokens at positions start, start + 1, ... of its sequence; each row's greedy next id."""
        batch = self.batch.batch
        batch.n_tokens = 0
        for seq, row in enumerate(rows):
            for offset, token in enumerate(row):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + offset, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = offset == len(row) - 1  # logits for each row's last token only
                batch.n_tokens += 1
        if llama_cpp.llama_decode(self.context.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.context.ctx), shape=(len(rows), self.n_vocab))
        return logits.argmax(axis=1).tolist()

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
        self.context.kv_cache_clear()
        next_ids = self.next_ids(prompts, 0)
        columns = [next_ids]
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            next_ids = self.next_ids([[token] for token in next_ids], len(prompts[0]) + step)
            columns.append(next_ids)
        return [list(row) for row in zip(*columns)], time.perf_counter() - start


def gptlab_prefill(model: GPTModel, settings: DecoderSettings) -> Callable[[list[int]], float]:
    decoder = Decoder(model, 1, settings)
    return lambda prompt: timed(lambda: decoder.prefill([prompt]))[1]


def llama_cpp_prefill(llm: llama_cpp.Llama) -> Callable[[list[int]], float]:
    def run(prompt):
        llm.reset()
        return timed(lambda: llm.eval(prompt))[1]  # one llama_decode: n_batch covers the prompt

    return run


def interleaved(jobs: dict[str, Callable[[], tuple[float, list]]], rounds: int) -> tuple[dict, dict]:
    """Each job's rate in every round (the order reversed every other round) and its output of the last round."""
    rates, outputs = {name: [] for name in jobs}, {}
    for round_index in range(rounds):
        for name in jobs if round_index % 2 == 0 else reversed(jobs):
            rate, outputs[name] = jobs[name]()
            rates[name].append(rate)
    return rates, outputs


def memory_bandwidth(repeats: int = 5) -> dict:
    """GB/s of the best of `repeats` reads (a sum) and copies of a buffer far larger than the cache; a copy
    counts the bytes read and written."""
    source = torch.ones(BANDWIDTH_BYTES // 4)
    target = torch.empty_like(source)
    read = max(source.nbytes / timed(source.sum)[1] for _ in range(repeats))
    copy = max(2 * source.nbytes / timed(lambda: target.copy_(source))[1] for _ in range(repeats))
    return {"read_GBps": read / 1e9, "copy_GBps": copy / 1e9}


def product_seconds(model: GPTModel, settings: DecoderSettings, repeats: int = 5) -> float:
    """Seconds of one batch-1 step's matrix products alone, in a step's order (the 48 linear layers, then the
    head), each on one row, with the decoding copy's own kernels; best of `repeats`. The weights far exceed
    the cache, so each pass streams them from memory as a step does. A step can be no faster than this."""
    copy = prepared_model(model, settings.dtype)
    names = [name for name, _ in copy.named_modules() if name.endswith(PRODUCTS)] + ["out_head"]
    dtype, width = copy.tok_emb.weight.dtype, copy.cfg.emb_dim
    rows = {width: torch.randn(1, 1, width, dtype=dtype), 4 * width: torch.randn(1, 1, 4 * width, dtype=dtype)}
    products = [(copy.get_submodule(name), rows[4 * width if name.endswith("ff.proj") else width]) for name in names]

    def run():
        for product, row in products:
            product(row)

    with torch.inference_mode():
        run()  # warm-up
        return min(timed(run)[1] for _ in range(repeats))


def torch_weight_bytes(model: nn.Module) -> int:
    """Bytes read in full per decoding step at batch 1 (see the module docstring): every leaf module's own
    tensors but the embeddings', and the prepacked weight of the int8 layers."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding) or next(module.children(), None) is not None:
            continue
        tensors = dict([*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)])
        total += sum(tensor.nbytes for tensor in tensors.values() if tensor is not None)
        if isinstance(module, DynamicInt8Linear):
            total += sum(tensor.nbytes for tensor in module.unpacked() if tensor is not None)
    return total


def gguf_weight_bytes(path: Path) -> int:
    """The same count from a GGUF file: every tensor but the position table, and the token embedding only
    where it serves as the output head (no output.weight)."""
    tensors = {tensor.name: int(tensor.n_bytes) for tensor in gguf.GGUFReader(path).tensors}
    lookups = {"position_embd.weight"} | ({"token_embd.weight"} if "output.weight" in tensors else set())
    return sum(size for name, size in tensors.items() if name not in lookups)


def agreeing_prefix(ours: list[int], reference: list[int]) -> int:
    """How many leading tokens equal the reference's."""
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))


def time_decoding(decoders: dict[str, dict[int, DecodeRun]], prompt: list[int], new_tokens: int, rounds: int) -> dict:
    """Decode tokens/s of every contestant at batch 1 and of those in BATCH8 at batch 8, and how many of
    each one's greedy tokens (row 0) equal gptlab fp32's."""
    results = {}
    for batch in (1, 8):
        names = [name for name in decoders if batch == 1 or name in BATCH8]
        prompts = [prompt] * batch
        for name in names:  # warm-up: the decoding copies of the weights, first-call allocations
            decoders[name][batch](prompts, 4)

        def job(name: str, batch: int = batch, prompts: list = prompts) -> tuple[float, list[list[int]]]:
            ids, seconds = decoders[name][batch](prompts, new_tokens)
            return batch * (new_tokens - 1) / seconds, ids

        rates, outputs = interleaved({name: functools.partial(job, name) for name in names}, rounds)
        reference = outputs["gptlab fp32"][0]
        results[batch] = {
            "tokens_per_s": {name: statistics.median(values) for name, values in rates.items()},
            "per_round_tokens_per_s": rates,
            "tokens_agreeing_with_gptlab_fp32": {
                name: agreeing_prefix(ids[0], reference) for name, ids in outputs.items()
            },
            "rows_all_equal": {name: all(row == ids[0] for row in ids) for name, ids in outputs.items()},
        }
    return results


def time_prefill(prefillers: dict[str, Callable[[list[int]], float]], vocab_size: int, rounds: int) -> dict:
    """Prompt tokens/s of one prefill pass at batch 1, for each of PREFILL_LENGTHS."""
    results = {}
    for length in PREFILL_LENGTHS:
        prompt = torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        for run in prefillers.values():
            run(prompt)  # warm-up

        def job(name: str, prompt: list[int] = prompt) -> tuple[float, None]:
            return len(prompt) / prefillers[name](prompt), None

        rates, _ = interleaved({name: functools.partial(job, name) for name in prefillers}, rounds)
        results[length] = {
            "tokens_per_s": {name: statistics.median(values) for name, values in rates.items()},
            "per_round_tokens_per_s": rates,
        }
    return results


def measure(new_tokens: int, rounds: int, prefill_rounds: int) -> dict:
    """Every contestant on the same weights: decode and prefill rates, weight bytes, bandwidth before and after."""
    model, hf_model = build_models()
    prompt = torch.randint(
        0, model.cfg.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    gptlab_models = {
        "gptlab fp32": (model, DecoderSettings()),
        "gptlab bf16": (model, DecoderSettings(dtype=torch.bfloat16)),
        "gptlab int8": (quantize_model(model, "int8"), DecoderSettings()),
        "gptlab int4": (quantize_model(model, "int4"), DecoderSettings()),
    }
    weight_bytes = {
        name: torch_weight_bytes(prepared_model(m, settings.dtype)) for name, (m, settings) in gptlab_models.items()
    }
    weight_bytes["transformers fp32"] = torch_weight_bytes(hf_model)
    bandwidth = [memory_bandwidth()]
    decoders = {
        name: dict.fromkeys((1, 8), gptlab_decode(m, settings)) for name, (m, settings) in gptlab_models.items()
    }
    prefillers = {name: gptlab_prefill(m, settings) for name, (m, settings) in gptlab_models.items()}
    threads = torch.get_num_threads()  # llama.cpp's too: its batch default is every CPU
    with tempfile.TemporaryDirectory() as folder:
        for name, outtype in GGUF_TYPES.items():
            path = Path(folder) / f"gpt2-{outtype}.gguf"
            export_gguf(model, load_tokenizer("gpt2"), path, outtype=outtype)
            weight_bytes[name] = gguf_weight_bytes(path)
            llm = llama_cpp.Llama(
                str(path),
                n_threads=threads,
                n_threads_batch=threads,
                n_ctx=model.cfg.context_length,
                n_batch=max(PREFILL_LENGTHS),
                n_ubatch=max(PREFILL_LENGTHS),
                verbose=False,
                logits_all=False,
            )
            decoders[name] = {1: llama_cpp_decode(llm), 8: LlamaCppRows(llm, 8, PROMPT_TOKENS + new_tokens).run}
            prefillers[name] = llama_cpp_prefill(llm)
        decoders["transformers fp32"] = dict.fromkeys((1, 8), transformers_decode(hf_model))
        decode = time_decoding(decoders, prompt, new_tokens, rounds)
        prefill = time_prefill(prefillers, model.cfg.vocab_size, prefill_rounds)
    products = {name: product_seconds(m, settings) for name, (m, settings) in gptlab_models.items()}
    bandwidth.append(memory_bandwidth())
    return {
        "weight_bytes_per_token": weight_bytes,
        "bandwidth": bandwidth,
        "decode": decode,
        "prefill": prefill,
        "product_seconds": products,
    }


def add_comparisons(report: dict) -> None:
    """Adds the ratios against llama.cpp and the roofline shares to the report."""
    best = max(max(sample.values()) for sample in report["bandwidth"])
    report["bandwidth_GBps"] = best
    rates = report["decode"][1]["tokens_per_s"]
    report["roofline_share"] = {
        name: rate * report["weight_bytes_per_token"][name] / (best * 1e9) for name, rate in rates.items()
    }
    report["ratio_vs_llama_cpp"] = {}
    for precision, (ours, theirs) in PAIRS.items():
        ratio = rates[ours] / rates[theirs]
        products = report["product_seconds"][ours]
        report["ratio_vs_llama_cpp"][precision] = {
            "ratio": ratio,
            "pass": ratio >= TARGET,
            "products_share_of_step": products * rates[ours],  # the step's time spent in its matrix products
            "products_GBps": report["weight_bytes_per_token"][ours] / products / 1e9,
            "ratio_bound_by_products": 1 / products / rates[theirs],  # were nothing but the products left
        }


def print_report(report: dict) -> None:
    machine = report["machine"]
    print(
        f"GPT-2 124M shape, random weights, greedy, {PROMPT_TOKENS}-token prompt, {report['new_tokens']} new tokens; "
        f"{machine['threads']} threads, {report['rounds']} interleaved rounds (medians; every round in the JSON); "
        f"load average {machine['load_average'][0]:.1f} before, {report['load_average_after'][0]:.1f} after"
    )
    reads = ", ".join(f"{sample['read_GBps']:.1f}" for sample in report["bandwidth"])
    copies = ", ".join(f"{sample['copy_GBps']:.1f}" for sample in report["bandwidth"])
    print(
        f"memory bandwidth: {report['bandwidth_GBps']:.1f} GB/s, the best of reads ({reads}) and copies ({copies}) "
        "before and after the contest"
    )
    print()
    decode, weights, share = report["decode"], report["weight_bytes_per_token"], report["roofline_share"]
    print(
        "decode, batch 1 (tokens/s; roofline share = tokens/s x weight MB per token / bandwidth; the weights counted\n"
        "are the 48 linear layers and the head as each stores them, with biases and LayerNorms, not the embedding lookups)"
    )
    print(
        f"{'precision':<9} {'gptlab':>8} {'MB/tok':>7} {'roofline':>8}   {'llama.cpp':>9} {'MB/tok':>7} {'roofline':>8}"
        f"   {'ratio':>5}  target {TARGET}"
    )
    for precision, (ours, theirs) in PAIRS.items():
        ratio = report["ratio_vs_llama_cpp"][precision]
        print(
            f"{precision:<9} {decode[1]['tokens_per_s'][ours]:>8.1f} {weights[ours] / 1e6:>7.0f} {share[ours]:>8.0%}   "
            f"{decode[1]['tokens_per_s'][theirs]:>9.1f} {weights[theirs] / 1e6:>7.0f} {share[theirs]:>8.0%}   "
            f"{ratio['ratio']:>5.2f}  {'PASS' if ratio['pass'] else 'MISS'}"
        )
    print(
        "\nthe matrix products alone (each of the 49 once, on one row, with gptlab's kernels): their share of a\n"
        "step, the rate they stream the weights at, and the ratio gptlab would reach were nothing else left"
    )
    for precision, (ours, _) in PAIRS.items():
        ratio = report["ratio_vs_llama_cpp"][precision]
        print(
            f"{precision:<9} {report['product_seconds'][ours] * 1e3:>6.2f} ms, {ratio['products_share_of_step']:.0%} "
            f"of the step, {ratio['products_GBps']:.1f} GB/s, ratio at most {ratio['ratio_bound_by_products']:.2f}"
        )
    for name in ("transformers fp32",):
        print(
            f"{name:<18} {decode[1]['tokens_per_s'][name]:>8.1f} tokens/s, {weights[name] / 1e6:.0f} MB/token, "
            f"roofline {share[name]:.0%}"
        )
    print()
    print(f"{'contestant':<18} {'batch 1':>8} {'batch 8':>8}  greedy tokens equal to gptlab fp32's (batch 1)")
    for name, rate in decode[1]["tokens_per_s"].items():
        rate8 = decode[8]["tokens_per_s"].get(name)
        print(
            f"{name:<18} {rate:>8.1f} {f'{rate8:.1f}' if rate8 else '-':>8}  "
            f"first {decode[1]['tokens_agreeing_with_gptlab_fp32'][name]} of {report['new_tokens']}"
        )
    print("(decode tokens/s; llama.cpp at batch 8: 8 sequences in one llama_batch through the C API)")
    print()
    print("prefill, batch 1 (prompt tokens/s):")
    print(f"{'contestant':<18}" + "".join(f"{f'{length} tokens':>12}" for length in report["prefill"]))
    for name in report["prefill"][PREFILL_LENGTHS[0]]["tokens_per_s"]:
        print(f"{name:<18}" + "".join(f"{row['tokens_per_s'][name]:>12.0f}" for row in report["prefill"].values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, 32 new tokens: a check that everything runs")
    parser.add_argument("--rounds", type=int, default=5, help="decoding rounds (prefill: twice as many)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and llama.cpp threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llama_cpp_compare.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    new_tokens = 32 if args.quick else 128
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = {
        "machine": {**machine_info(), "llama_cpp_python": llama_cpp.__version__},
        "new_tokens": new_tokens,
        "rounds": args.rounds,
        **measure(new_tokens, args.rounds, 2 * args.rounds),
    }
    add_comparisons(report)
    report["seconds"] = time.perf_counter() - start
    report["load_average_after"] = os.getloadavg()
    print_report(report)
    print(f"({report['seconds']:.0f} s)")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
