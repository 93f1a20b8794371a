"""The `gptlab` command line. User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

import torch

from .config import PRESETS, GPTConfig, get_config
from .generate import generate
from .model import GPTModel
from .report import parameter_report
from .tokenizer import load_tokenizer


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gpt2", choices=list(PRESETS), help="preset shape (default gpt2)")
    for field, kind in [("vocab_size", int), ("context_length", int), ("emb_dim", int), ("n_heads", int),
                        ("n_layers", int), ("drop_rate", float)]:
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, help=f"override the preset's {field}")
    parser.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None)


def config_from_args(args: argparse.Namespace) -> GPTConfig:
    fields = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias", "tie_embeddings")
    return get_config(args.model, **{field: getattr(args, field) for field in fields})


def cmd_info(args: argparse.Namespace) -> None:
    print(parameter_report(config_from_args(args)).format(args.model))


def cmd_generate(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    tokenizer = load_tokenizer()
    torch.manual_seed(args.seed)
    model = GPTModel(cfg).eval()
    print(f"(untrained {args.model} weights, seed {args.seed}: expect gibberish)", file=sys.stderr)
    ids = torch.tensor([tokenizer.encode(args.prompt) or [tokenizer.eot_id]])
    out = generate(model, ids[:, -cfg.context_length:], args.max_new_tokens)
    print(tokenizer.decode(out[0].tolist()))


def cmd_demo(args: argparse.Namespace) -> None:
    print(parameter_report(get_config("gpt2")).format("gpt2"))
    print()
    print("Greedy generation, 20 tokens from 'Hello, I am' with UNTRAINED gpt2 weights (random, seed 0):")
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = GPTModel(get_config("gpt2")).eval()
    out = generate(model, torch.tensor([tokenizer.encode("Hello, I am")]), 20)
    print(repr(tokenizer.decode(out[0].tolist())))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description="A GPT-2-style language model built from scratch.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="print a model's parameter report")
    add_model_arguments(info)
    info.set_defaults(run=cmd_info)

    gen = commands.add_parser("generate", help="generate text from a prompt")
    add_model_arguments(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=cmd_generate)

    demo = commands.add_parser("demo", help="the main job on the embedded default (what `make demo` runs)")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UserError, ValueError) as error:
        print(f"gptlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
