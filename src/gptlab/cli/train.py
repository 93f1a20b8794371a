"""`gptlab train`, `gptlab eval` and `gptlab demo`."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model, read_config, read_model_config
from ..inference.generate import GenerationOptions
from ..report import parameter_report
from ..training.trainer import TrainConfig
from .common import (
    add_model_arguments,
    config_from_args,
    reject_shape_options,
)

DEFAULT_TRAIN_MODEL = "gpt2-micro"
DEFAULT_TRAIN_TOKENIZER = "char"

# Every token starts a window (stride 1): each epoch sees the text at new offsets, which on the small
# embedded corpus generalises far better than fixed non-overlapping windows (README, time to quality).
# A sinusoidal start for the position table skips the plateau where a character model otherwise
# spends about a seventh of its 5 minutes.
TRAIN_DEFAULTS = TrainConfig(time_budget=300, stride=1, pos_init="sinusoidal")


def cmd_train(args: argparse.Namespace) -> None:
    from .. import data
    from ..training import trainer as train

    cfg = train.TrainConfig(
        out_dir=args.out, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, stride=args.stride,
        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        pos_init=args.pos_init, grad_clip=args.grad_clip, max_steps=args.max_steps, max_tokens=args.max_tokens,
        time_budget=args.time_budget, eval_interval=args.eval_interval, sample_tokens=args.sample_tokens,
        dtype=args.dtype, compile=args.compile, seed=args.seed, device=args.device, log_interval=args.log_interval,
        progress=not args.no_progress,
    )
    runtime = train.start_runtime(args.device)
    try:
        if runtime.is_main:
            train.check_out_dir(Path(args.out), args.resume, args.overwrite)
        corpus = data.read_corpus(args.data, args.invalid_utf8) if args.data else data.default_corpus()
        init_state = None
        if args.init:
            reject_shape_options(args, "--init")
        if args.resume:  # the weights and tokenizer come from the run's last checkpoint
            _, tokenizer, _ = read_config(Path(args.out) / "last")
        elif args.init:
            model, tokenizer = load_model(args.init)
            init_state = model.state_dict()
        else:
            tokenizer = data.build_tokenizer(args.tokenizer, corpus, args.merges)
        if args.init:
            model_cfg, _ = read_model_config(args.init)
        else:
            model_cfg = config_from_args(args).replace(vocab_size=tokenizer.vocab_size)
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
    kind = {name: value for name, value in tokenizer.spec().items() if name != "chars"}
    key = json.dumps([[doc.path for doc in corpus.documents], kind])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gptlab" / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:16]


def cmd_eval(args: argparse.Namespace) -> None:
    from .. import data
    from ..training import trainer as train

    model, tokenizer = load_model(args.checkpoint)
    if args.data:
        documents = [doc.read_text() for doc in data.read_corpus(args.data, args.invalid_utf8).documents]
        what = f"the whole text of {', '.join(args.data)}"
    else:
        documents = [data.split_text(data.default_corpus_text())[1]]
        what = "the held-out 10% of the embedded corpus (pydoc_data.topics)"
    # as in training: documents' tokens with end-of-text between them; a literal marker in a file is text
    tokens = np.array([t for i, ids in enumerate(tokenizer.encode_batch(documents)) for t in ([tokenizer.eot_id] if i else []) + ids],
                      dtype=np.int64)
    scored = tokens[1:]  # the first token is context only; a document boundary stands for no text
    target_bytes = len(tokenizer.decode_bytes(scored[scored != tokenizer.eot_id].tolist()))
    result = train.evaluate(model, tokens, target_bytes, args.batch_size)
    print(f"{args.checkpoint} on {what}:")
    print(result.format())


def cmd_demo(args: argparse.Namespace) -> None:
    """Train the default model on the embedded corpus for a few minutes, then sample from it."""
    from ..inference.generate import generate_text
    from ..training.trainer import RUN_MARKER

    out = Path(args.out)
    train_args = ["train", "--out", str(out), "--time-budget", str(args.time_budget), "--eval-interval", "100000"]
    if (out / RUN_MARKER).is_file():
        train_args.append("--overwrite")  # a demo run replaces the previous demo run, never other files
    print(f"Training gptlab's default model on Python's bundled documentation for {args.time_budget:.0f} s...")
    from . import build_parser  # the package imports this module

    cmd_train(build_parser().parse_args(train_args))
    model, tokenizer = load_model(out / "best")
    prompts = ["The ", "def ", "A list "]
    options = GenerationOptions(max_new_tokens=200, temperature=0.8, top_k=40, seed=0)
    print("\nSamples from the trained model (temperature 0.8, top-k 40, seed 0):")
    for prompt, text in zip(prompts, generate_text(model, tokenizer, prompts, options)):
        print(f"--- {prompt!r}\n{prompt}{text}")
    print(f"\nNext: gptlab generate --checkpoint {out / 'best'} --prompt 'The '   |   "
          f"gptlab eval --checkpoint {out / 'best'}")



def add_parsers(commands) -> None:
    tr = commands.add_parser("train", help="train a model on text (files, folders, globs; default: Python's docs)")
    add_model_arguments(tr, default=DEFAULT_TRAIN_MODEL)
    tr.add_argument("--data", nargs="+", help="files, folders or glob patterns (default: the embedded corpus)")
    tr.add_argument("--tokenizer", choices=["char", "gpt2"], default=DEFAULT_TRAIN_TOKENIZER)
    tr.add_argument("--merges", type=int,
                    help="with --tokenizer gpt2: keep only GPT-2's first N BPE merges (vocabulary 257 + N)")
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
    tr.add_argument("--pos-init", choices=["gpt2", "sinusoidal"], default=defaults.pos_init,
                    help=f"position table of a new model (default {defaults.pos_init})")
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
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--time-budget", type=float, default=180.0, help="seconds of training (default 180)")
    demo.set_defaults(run=cmd_demo)
