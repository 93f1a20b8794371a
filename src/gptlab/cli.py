"""The `gptlab` command line. User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model, read_model_config
from .config import PRESETS, GPTConfig, get_config
from .interop import HF_VOCAB_FILE, HUB_REPOS, DownloadError, download_gpt2, export_hf
from .generate import generate
from .model import GPTModel
from .report import parameter_report
from .tokenizer import load_tokenizer
from .checkpoint import read_config
from .train import TrainConfig, TrainingError

DEFAULT_TRAIN_MODEL = "gpt2-micro"
DEFAULT_TRAIN_TOKENIZER = "char"

TRAIN_DEFAULTS = TrainConfig(time_budget=300)


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


CHECKPOINT_FORMAT_NAMES = {"gptlab": "gptlab checkpoint", "hf": "Hugging Face GPT-2 folder"}


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "gpt2") -> None:
    parser.add_argument("--model", default=default, choices=list(PRESETS), help=f"preset shape (default {default})")
    for field, kind in [("vocab_size", int), ("context_length", int), ("emb_dim", int), ("n_heads", int),
                        ("n_layers", int), ("drop_rate", float)]:
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, help=f"override the preset's {field}")
    parser.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None)


def config_from_args(args: argparse.Namespace) -> GPTConfig:
    fields = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias", "tie_embeddings")
    return get_config(args.model, **{field: getattr(args, field) for field in fields})


def cmd_info(args: argparse.Namespace) -> None:
    if args.checkpoint is None:
        print(parameter_report(config_from_args(args)).format(args.model))
        return
    shape_options = [field.name for field in dataclasses.fields(GPTConfig) if getattr(args, field.name) is not None]
    if shape_options:
        option = "--" + shape_options[0].replace("_", "-")
        raise UserError(f"--checkpoint takes the model's shape from the checkpoint; drop {option}")
    cfg, kind = read_model_config(args.checkpoint)  # config.json only: no weights are read
    print(f"checkpoint {args.checkpoint} ({CHECKPOINT_FORMAT_NAMES[kind]})")
    print(parameter_report(cfg).format(Path(args.checkpoint).name))


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


def cmd_train(args: argparse.Namespace) -> None:
    from . import data, train

    cfg = train.TrainConfig(
        out_dir=args.out, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, stride=args.stride,
        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, max_steps=args.max_steps, max_tokens=args.max_tokens, time_budget=args.time_budget,
        eval_interval=args.eval_interval, sample_tokens=args.sample_tokens, dtype=args.dtype, compile=args.compile,
        seed=args.seed, device=args.device, log_interval=args.log_interval, progress=not args.no_progress,
    )
    runtime = train.start_runtime(args.device)
    try:
        if runtime.is_main:
            train.check_out_dir(Path(args.out), args.resume, args.overwrite)
        corpus = data.read_corpus(args.data, args.invalid_utf8) if args.data else data.default_corpus()
        init_state = None
        if args.resume:
            _, tokenizer, _ = read_config(Path(args.out) / "last")
        elif args.init:
            model, tokenizer = load_model(args.init)
            init_state = model.state_dict()
        else:
            tokenizer = data.build_tokenizer(args.tokenizer, corpus)
        model_cfg = model.cfg if args.init else config_from_args(args).replace(vocab_size=tokenizer.vocab_size)
        cache_dir = args.cache_dir or default_cache_dir(corpus, tokenizer)
        if runtime.is_main:
            cache = data.build_token_cache(corpus, tokenizer, cache_dir, progress=not args.no_progress)
        if runtime.distributed:
            torch.distributed.barrier()
        if not runtime.is_main:
            cache = data.open_token_cache(cache_dir)
        corpus_data = train.TrainingData(cache.train_tokens, cache.val_tokens, cache.val_target_bytes)
        if runtime.is_main:
            print(f"data: {len(cache.train_tokens):,} training and {len(cache.val_tokens):,} validation tokens "
                  f"({type(tokenizer).__name__}, vocabulary {tokenizer.vocab_size:,}); token cache {cache_dir}")
            print("\n".join(parameter_report(model_cfg).format(args.init or args.model).splitlines()[:2]))
        result = train.train(model_cfg, cfg, tokenizer, corpus_data, runtime=runtime, resume=args.resume,
                             overwrite=args.overwrite, init_state=init_state)
    finally:
        train.stop_runtime(runtime)
    if runtime.is_main:
        out = result.out_dir
        print(f"stopped by {result.stopped_by} after {result.state.step} steps, {result.state.tokens_seen:,} tokens, "
              f"{result.state.elapsed:.0f} s")
        print(f"validation: {result.final_eval.format()}")
        print(f"checkpoints: {out / 'last'} and {out / 'best'}; metrics: {out / 'metrics.jsonl'}; plot: {out / 'loss.png'}")


def default_cache_dir(corpus, tokenizer) -> Path:
    """One cache per (sources, tokenizer kind) under the user's cache folder; its manifest decides reuse."""
    key = json.dumps([[doc.path for doc in corpus.documents], tokenizer.spec()["type"]])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gptlab" / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:16]


def cmd_eval(args: argparse.Namespace) -> None:
    from . import data, train

    model, tokenizer = load_model(args.checkpoint)
    if args.data:
        corpus = data.read_corpus(args.data, args.invalid_utf8)
        text = corpus.text()
        what = f"the whole text of {', '.join(args.data)}"
    else:
        text = data.split_text(data.default_corpus_text())[1]
        what = "the held-out 10% of the embedded corpus (pydoc_data.topics)"
    tokens = np.array(tokenizer.encode(text, allow_special=True), dtype=np.int64)
    target_bytes = int(data.token_byte_lengths(tokenizer)[tokens[1:]].sum())  # the first token is context only
    result = train.evaluate(model, tokens, target_bytes, args.batch_size)
    print(f"{args.checkpoint} on {what}:")
    print(result.format())


def cmd_demo(args: argparse.Namespace) -> None:
    print(parameter_report(get_config("gpt2")).format("gpt2"))
    print()
    print("Greedy generation, 20 tokens from 'Hello, I am' with UNTRAINED gpt2 weights (random, seed 0):")
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = GPTModel(get_config("gpt2")).eval()
    out = generate(model, torch.tensor([tokenizer.encode("Hello, I am")]), 20)
    print(repr(tokenizer.decode(out[0].tolist())))


def cmd_convert(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.checkpoint)
    files = export_hf(model, tokenizer, args.outdir, force=args.force)
    print(f"wrote {args.outdir}: {', '.join(files)}")
    if HF_VOCAB_FILE not in files:
        print("note: transformers has no equivalent of this character-level tokenizer, so the folder has no tokenizer "
              "files; gptlab's load_model restores it from config.json", file=sys.stderr)


def cmd_download(args: argparse.Namespace) -> None:
    outdir = args.out or Path("models") / args.name
    download_gpt2(args.name, outdir)
    print(f"downloaded {HUB_REPOS[args.name]} to {outdir}; use it with --checkpoint {outdir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description="A GPT-2-style language model built from scratch.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="print a model's parameter report")
    add_model_arguments(info)
    info.add_argument("--checkpoint", type=Path, help="report on the model in this gptlab or Hugging Face GPT-2 folder")
    info.set_defaults(run=cmd_info)

    gen = commands.add_parser("generate", help="generate text from a prompt")
    add_model_arguments(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=cmd_generate)

    tr = commands.add_parser("train", help="train a model on text (files, folders, globs; default: Python's docs)")
    add_model_arguments(tr, default=DEFAULT_TRAIN_MODEL)
    tr.add_argument("--data", nargs="+", help="files, folders or glob patterns (default: the embedded corpus)")
    tr.add_argument("--tokenizer", choices=["char", "gpt2"], default=DEFAULT_TRAIN_TOKENIZER)
    tr.add_argument("--out", default="runs/default", help="run folder: checkpoints, metrics.jsonl, loss.png")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    tr.add_argument("--overwrite", action="store_true", help="replace an earlier gptlab run in --out")
    tr.add_argument("--init", help="start from a checkpoint's weights (gptlab or Hugging Face GPT-2 folder)")
    tr.add_argument("--cache-dir", help="token cache folder (default: under ~/.cache/gptlab/tokens)")
    tr.add_argument("--replace-invalid-utf8", dest="invalid_utf8", action="store_const", const="replace",
                    default="strict", help="read invalid UTF-8 bytes as U+FFFD instead of failing")
    defaults = TRAIN_DEFAULTS
    for name, kind in [("batch_size", int), ("micro_batch_size", int), ("stride", int), ("lr", float),
                       ("min_lr_ratio", float), ("warmup_steps", int), ("weight_decay", float), ("grad_clip", float),
                       ("max_steps", int), ("max_tokens", int), ("time_budget", float), ("eval_interval", int),
                       ("sample_tokens", int), ("seed", int), ("log_interval", int)]:
        tr.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    tr.add_argument("--dtype", choices=["bfloat16", "float32"], default=defaults.dtype, help="autocast dtype")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(run=cmd_train)

    ev = commands.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on a text")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", nargs="+", help="files, folders or globs (default: the embedded corpus' held-out split)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--replace-invalid-utf8", dest="invalid_utf8", action="store_const", const="replace", default="strict")
    ev.set_defaults(run=cmd_eval)

    demo = commands.add_parser("demo", help="the main job on the embedded default (what `make demo` runs)")
    demo.set_defaults(run=cmd_demo)

    convert = commands.add_parser("convert", help="export a model folder for Hugging Face transformers")
    convert.add_argument("--to-hf", action="store_true", required=True,
                         help="write a GPT-2 folder that transformers' from_pretrained loads")
    convert.add_argument("checkpoint", type=Path, help="a gptlab checkpoint or Hugging Face GPT-2 folder")
    convert.add_argument("outdir", type=Path, help="the folder to write (new, empty, or an earlier export)")
    convert.add_argument("--force", action="store_true", help="replace OUTDIR even if it holds other files")
    convert.set_defaults(run=cmd_convert)

    download = commands.add_parser("download", help="fetch OpenAI's GPT-2 weights from the Hugging Face Hub")
    download.add_argument("name", choices=list(HUB_REPOS))
    download.add_argument("--out", type=Path, help="destination folder (default models/NAME)")
    download.set_defaults(run=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UserError, TrainingError, ValueError) as error:
        print(f"gptlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except DownloadError as error:  # not the user's mistake: the network or an optional package is missing
        print(f"gptlab {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
