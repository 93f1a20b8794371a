"""`gptlab generate`: sample text from a checkpoint or an untrained preset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..inference.generate import GenerationOptions, decoding_model, stream_batch
from ..model import GPTModel
from ..tokenizer import Tokenizer, load_tokenizer
from .common import (
    UserError,
    add_model_arguments,
    config_from_args,
    reject_shape_options,
)


def generation_model(args: argparse.Namespace) -> tuple[GPTModel, Tokenizer]:
    """The model to generate with, its weights laid out for decoding once for every prompt to come."""
    dtype = getattr(torch, args.dtype)
    if args.checkpoint is not None:
        reject_shape_options(args)
        model, tokenizer = load_model(args.checkpoint, dtype=dtype)
    else:
        torch.manual_seed(args.seed)
        model, tokenizer = GPTModel(config_from_args(args)).to(dtype).eval(), load_tokenizer()
        print(f"(untrained {args.model} weights, seed {args.seed}: expect gibberish)", file=sys.stderr)
    return decoding_model(model), tokenizer


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    try:
        return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), num_samples=args.num_samples)
    except ValueError as error:  # its messages begin with the option's name, so "--" makes it the flag
        raise UserError(f"--{error}") from None


def read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt from --prompt or --prompt-file; None with --interactive (prompts come from stdin)."""
    given = [name for name in ("prompt", "prompt_file", "interactive") if getattr(args, name) not in (None, False)]
    if len(given) != 1:
        raise UserError("give exactly one of --prompt TEXT, --prompt-file FILE or --interactive")
    if args.prompt_file is None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8").removesuffix("\n")
    except OSError as error:
        raise UserError(f"cannot read --prompt-file {args.prompt_file}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None


def print_generation(model: GPTModel, tokenizer: Tokenizer, prompt: str, options: GenerationOptions) -> None:
    """Print the prompt and its continuation: the first sample as it is produced, any others once done."""
    context = model.cfg.context_length
    num_tokens = len(tokenizer.encode(prompt))
    if num_tokens > context:
        print(f"warning: the prompt has {num_tokens} tokens, more than the model's context_length {context}; "
              f"keeping its last {context}", file=sys.stderr)
    samples = options.num_samples
    later: list[list[str]] = [[] for _ in range(samples)]
    if samples > 1:
        print(f"--- sample 1 of {samples} ---")
    print(prompt, end="", flush=True)
    for row, piece in stream_batch(model, tokenizer, [prompt], options):
        if row == 0:
            print(piece, end="", flush=True)
        else:
            later[row].append(piece)
    print()
    for row in range(1, samples):
        print(f"--- sample {row + 1} of {samples} ---")
        print(prompt + "".join(later[row]))


def cmd_generate(args: argparse.Namespace) -> None:
    options = generation_options(args)
    prompt = read_prompt(args)
    model, tokenizer = generation_model(args)
    if prompt is not None:
        print_generation(model, tokenizer, prompt, options)
        return
    for line in sys.stdin:  # --interactive: one prompt per line until EOF, the model loaded once
        print_generation(model, tokenizer, line.removesuffix("\n"), options)



def add_parsers(commands) -> None:
    gen = commands.add_parser("generate", help="generate text from a prompt")
    add_model_arguments(gen)
    gen.add_argument("--checkpoint", type=Path, help="generate with the model in this checkpoint folder instead of --model's "
                     "untrained weights")
    gen.add_argument("--prompt", help="the text to continue (empty: start from end-of-text)")
    gen.add_argument("--prompt-file", help="read the prompt from this UTF-8 file (one final newline is dropped)")
    gen.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    gen.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample from the fewest tokens holding this much probability")
    gen.add_argument("--seed", type=int, default=0, help="seeds the sampling (and --model's random weights)")
    gen.add_argument("--stop", action="append", default=[], help="end at this text, not printed (repeatable)")
    gen.add_argument("--num-samples", type=int, default=1, help="samples per prompt, generated as one batch")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights while generating")
    gen.set_defaults(run=cmd_generate)
