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

from .checkpoint import load_model, read_config, read_model_config
from .config import PRESETS, GPTConfig, get_config
from .inference.generate import GenerationOptions, decoding_model, stream_batch
from .interop.hf import (
    HF_VOCAB_FILE,
    HUB_REPOS,
    DownloadError,
    download_gpt2,
    export_hf,
)
from .model import GPTModel
from .report import parameter_report
from .tokenizer import Tokenizer, load_tokenizer
from .training.trainer import TrainConfig, TrainingError

DEFAULT_TRAIN_MODEL = "gpt2-micro"
DEFAULT_TRAIN_TOKENIZER = "char"

# Every token starts a window (stride 1): each epoch sees the text at new offsets, which on the small
# embedded corpus generalises far better than fixed non-overlapping windows (README, time to quality).
# A sinusoidal start for the position table skips the plateau where a character model otherwise
# spends about a seventh of its 5 minutes.
TRAIN_DEFAULTS = TrainConfig(time_budget=300, stride=1, pos_init="sinusoidal")


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


CHECKPOINT_FORMAT_NAMES = {"gptlab": "gptlab checkpoint", "hf": "Hugging Face GPT-2 folder"}


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "gpt2") -> None:
    parser.add_argument("--model", default=default, choices=list(PRESETS), help=f"preset shape (default {default})")
    for field, kind in [("vocab_size", int), ("context_length", int), ("emb_dim", int), ("n_heads", int),
                        ("n_layers", int), ("drop_rate", float), ("attn_drop_rate", float)]:
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, help=f"override the preset's {field}")
    parser.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None)


def config_from_args(args: argparse.Namespace) -> GPTConfig:
    fields = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "attn_drop_rate", "qkv_bias",
              "tie_embeddings")
    return get_config(args.model, **{field: getattr(args, field) for field in fields})


def reject_shape_options(args: argparse.Namespace, source: str = "--checkpoint") -> None:
    shape_options = [field.name for field in dataclasses.fields(GPTConfig) if getattr(args, field.name) is not None]
    if shape_options:
        option = "--" + shape_options[0].replace("_", "-")
        raise UserError(f"{source} takes the model's shape from the checkpoint; drop {option}")


def cmd_info(args: argparse.Namespace) -> None:
    if args.checkpoint is None:
        print(parameter_report(config_from_args(args)).format(args.model))
        return
    reject_shape_options(args)
    cfg, kind = read_model_config(args.checkpoint)  # config.json only: no weights are read
    print(f"checkpoint {args.checkpoint} ({CHECKPOINT_FORMAT_NAMES[kind]})")
    print(parameter_report(cfg).format(Path(args.checkpoint).name))


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


def cmd_train(args: argparse.Namespace) -> None:
    from . import data
    from .training import trainer as train

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
    from . import data
    from .training import trainer as train

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
    from .inference.generate import generate_text
    from .training.trainer import RUN_MARKER

    out = Path(args.out)
    train_args = ["train", "--out", str(out), "--time-budget", str(args.time_budget), "--eval-interval", "100000"]
    if (out / RUN_MARKER).is_file():
        train_args.append("--overwrite")  # a demo run replaces the previous demo run, never other files
    print(f"Training gptlab's default model on Python's bundled documentation for {args.time_budget:.0f} s...")
    cmd_train(build_parser().parse_args(train_args))
    model, tokenizer = load_model(out / "best")
    prompts = ["The ", "def ", "A list "]
    options = GenerationOptions(max_new_tokens=200, temperature=0.8, top_k=40, seed=0)
    print("\nSamples from the trained model (temperature 0.8, top-k 40, seed 0):")
    for prompt, text in zip(prompts, generate_text(model, tokenizer, prompts, options)):
        print(f"--- {prompt!r}\n{prompt}{text}")
    print(f"\nNext: gptlab generate --checkpoint {out / 'best'} --prompt 'The '   |   "
          f"gptlab eval --checkpoint {out / 'best'}")


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
