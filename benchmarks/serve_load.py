"""Load on `gptlab serve`: 1, 4, 8 and 16 concurrent streaming clients against GPT-2 124M's shape.

A checkpoint of GPT-2 124M's shape with random weights is served by `gptlab serve` in a child process on
this machine (localhost only). Each client sends its requests one after another, each a 32-token prompt
asking for 64 tokens, greedy, streamed, and the end-of-text token banned (logit_bias -100), so every
request makes all 64. Per level: aggregate tokens/s (every completion token over the level's wall time),
time to first token and time per token after it (p50 and p95 over requests and gaps), and failures.

Baseline, in the same run: `gptlab generate`'s own speed on the same checkpoint in this process
(generate_ids, the same prompt and 64 greedy tokens, batch 1), measured before the server starts so the
two never share the cores. Targets (issue 12): 8 clients ≥ 4x one client's tokens/s; 1 client within
10% of gptlab generate.

    .venv/bin/python benchmarks/serve_load.py [--clients 1 4 8 16] [--requests 2] [--dtype bfloat16]
        [--quantize int8|int4] [--out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from common import machine_info, timed, write_report

from gptlab.checkpoint import save_model
from gptlab.config import get_config
from gptlab.inference.generate import generate_ids
from gptlab.inference.quantize import quantize_model
from gptlab.inference.sampling import GenerationOptions
from gptlab.loading import load_model
from gptlab.model import GPTModel
from gptlab.serve.background import BackgroundServer
from gptlab.tokenizer import load_tokenizer

PROMPT_TOKENS, NEW_TOKENS = 32, 64
DEFAULT_OUT = Path(__file__).parent / "results" / "serve_load.json"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def stream_request(url: str, prompt: list[int], eot_id: int) -> dict:
    """One streamed completion: when each chunk arrived, and the completion tokens the server counted."""
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    body = {
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(eot_id): -100},
    }
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    arrivals, tokens = [], 0
    for line in response:
        if line.startswith(b"data: [DONE]"):
            break
        if line.startswith(b"data: "):
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                arrivals.append(time.perf_counter())
    connection.close()
    return {"start": start, "arrivals": arrivals, "end": time.perf_counter(), "tokens": tokens}


def run_level(url: str, clients: int, requests_each: int, prompt: list[int], eot_id: int) -> dict:
    """`clients` threads, each sending requests_each requests one after another."""
    results, failures = [], []

    def client() -> None:
        for _ in range(requests_each):
            try:
                results.append(stream_request(url, prompt, eot_id))
            except Exception as error:  # noqa: BLE001 (counted and reported, not raised: the level goes on)
                failures.append(repr(error))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    first_token = [result["arrivals"][0] - result["start"] for result in results if result["arrivals"]]
    gaps = [later - earlier for result in results for earlier, later in zip(result["arrivals"], result["arrivals"][1:])]
    tokens = sum(result["tokens"] for result in results)
    return {
        "clients": clients,
        "requests": len(results) + len(failures),
        "failures": len(failures),
        "failure_messages": failures[:3],
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "first_token_p50_ms": 1000 * percentile(first_token, 0.5),
        "first_token_p95_ms": 1000 * percentile(first_token, 0.95),
        "per_token_p50_ms": 1000 * percentile(gaps, 0.5),
        "per_token_p95_ms": 1000 * percentile(gaps, 0.95),
    }


def generate_speed(checkpoint: Path, prompt: list[int], dtype: str, quantize: str | None, rounds: int = 3) -> float:
    """gptlab generate's tokens/s on the same weights, precision, prompt and length (best of a few rounds after
    a warm-up)."""
    model, _ = load_model(checkpoint, dtype=getattr(torch, dtype))
    if quantize:
        model = quantize_model(model, quantize)
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, temperature=0.0)
    generate_ids(model, [prompt], options)  # makes the decoding layout, as the server does at start
    return max(NEW_TOKENS / timed(lambda: generate_ids(model, [prompt], options))[1] for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the server's weights")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="the server's int8 or int4 weights")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    precision = ["--dtype", args.dtype, *(["--quantize", args.quantize] if args.quantize else [])]

    tokenizer = load_tokenizer()
    prompt = torch.randint(
        0, tokenizer.vocab_size - 1, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "gpt2-124m-random"
        torch.manual_seed(0)
        save_model(checkpoint, GPTModel(get_config("gpt2")).eval(), tokenizer)
        baseline = generate_speed(checkpoint, prompt, args.dtype, args.quantize)
        print(f"{' '.join(precision)}: gptlab generate, batch 1: {baseline:.1f} tokens/s")
        with BackgroundServer(checkpoint, *precision) as server:
            stream_request(server.url, prompt, tokenizer.eot_id)  # warm-up
            levels = []
            for clients in args.clients:
                level = run_level(server.url, clients, args.requests, prompt, tokenizer.eot_id)
                levels.append(level)
                print(
                    f"{clients:>2} clients: {level['tokens_per_s']:6.1f} tokens/s, first token p50 "
                    f"{level['first_token_p50_ms']:.0f} ms (p95 {level['first_token_p95_ms']:.0f}), per token p50 "
                    f"{level['per_token_p50_ms']:.0f} ms (p95 {level['per_token_p95_ms']:.0f}), failures {level['failures']}"
                )
    one = next((level["tokens_per_s"] for level in levels if level["clients"] == 1), None)
    ratios = {}
    if one:
        ratios["one_client_vs_generate"] = one / baseline
        for level in levels:
            ratios[f"{level['clients']}_clients_vs_one"] = level["tokens_per_s"] / one
        print(
            f"1 client / gptlab generate: {ratios['one_client_vs_generate']:.2f}x (target >= 0.90); "
            + ", ".join(
                f"{key.split('_')[0]} clients / 1: {value:.2f}x"
                for key, value in ratios.items()
                if key.endswith("vs_one")
            )
            + " (target at 8: >= 4x)"
        )
    write_report(
        {
            "benchmark": "serve_load",
            "machine": machine_info(),
            "precision": {"dtype": args.dtype, "quantize": args.quantize},
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "generate_tokens_per_s": baseline,
            "levels": levels,
            "ratios": ratios,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
