"""`gptlab train`, `gptlab eval` and `gptlab demo`: argument parsing over gptlab.train and gptlab.evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import PRESETS
from ..errors import UserError
from ..finetune.hooks import BASE_DTYPES
from ..finetune.lora import TARGETS
from ..finetune.pipeline import train
from ..inference.benchmarks import TASKS
from ..training.config import DTYPES, FINETUNE_DEFAULTS, LOGGERS, OPTIMIZERS, SCHEDULES, resolve
from ..training.pipeline import PREPARED_FIXES, evaluate, prepare
from ..training.state import RUN_MARKER
from .common import add_command

DEFAULTS = resolve({}).flat()

# Every setting of a run: (option, argparse keywords, meaning). Defaults are shown as a new model gets them
# (resolve), so the help cannot drift from what runs. Every option is parsed with default SUPPRESS: the
# namespace then holds only what was typed, which is what overrides a recipe and what a resume must check.
SETTINGS: list[tuple[str, str, dict]] = [
    (
        "data",
        "data",
        dict(
            nargs="+",
            metavar="PATH",
            help="files, folders or glob patterns to train on; a folder is "
            "read recursively (hidden files skipped, binary files reported). Default: the embedded "
            "corpus, Python's bundled documentation",
        ),
    ),
    (
        "data",
        "include",
        dict(action="append", metavar="GLOB", help="read only files in --data folders that match (repeatable)"),
    ),
    ("data", "exclude", dict(action="append", metavar="GLOB", help="leave out files that match (repeatable)")),
    (
        "data",
        "invalid_utf8",
        dict(
            flag="--replace-invalid-utf8",
            action="store_const",
            const="replace",
            help="read invalid UTF-8 bytes as U+FFFD instead of failing",
        ),
    ),
    (
        "data",
        "tokenizer",
        dict(
            metavar="{char,gpt2,FOLDER}",
            help="char: one id per character of the corpus; gpt2: GPT-2's byte-level BPE; FOLDER: a byte-level BPE "
            "`gptlab tokenizer train` made",
        ),
    ),
    (
        "data",
        "merges",
        dict(
            type=int,
            help="GPT-2's BPE with only its first N merges (vocabulary 257 + N); "
            "--tokenizer gpt2 alone keeps all 50,000",
        ),
    ),
    (
        "data",
        "text_field",
        dict(
            metavar="FIELD",
            help="in files of records (.jsonl, .jsonl.gz, .jsonl.zst, .json, "
            ".parquet): the field or column each document's text is in (default: text)",
        ),
    ),
    (
        "data",
        "val_fraction",
        dict(
            type=float, metavar="F", help="hold out the last F of the text, by characters, for validation (default 0.1)"
        ),
    ),
    (
        "data",
        "val_data",
        dict(
            nargs="+",
            metavar="PATH",
            help="validate on these files, folders or globs instead of a held-out share (FineWeb's val shard); "
            "every file of --data is then trained on",
        ),
    ),
    (
        "data",
        "prepared",
        dict(
            metavar="CACHE",
            help="train from the token cache `gptlab prepare` wrote there, reading "
            "no source (it fixes the data, the tokenizer and the split)",
        ),
    ),
    (
        "data",
        "cache_dir",
        dict(help="token cache folder; may be on storage every machine shares (default: under ~/.cache/gptlab/tokens)"),
    ),
    ("model", "model", dict(choices=list(PRESETS), help="preset shape")),
    (
        "model",
        "init",
        dict(
            metavar="CHECKPOINT",
            help="fine-tune: start from this gptlab or Hugging Face GPT-2 "
            f"folder's weights, shape and tokenizer; changes the defaults to {FINETUNE_DEFAULTS}",
        ),
    ),
    (
        "model",
        "vocab_size",
        dict(
            type=int,
            help="pad the vocabulary to this size (nanoGPT pads 50257 to 50304 for speed); default: the tokenizer's",
        ),
    ),
    (
        "model",
        "context_length",
        dict(
            type=int,
            help="tokens per window (nanoGPT's block_size, GPT-2's n_positions); with --init at most the checkpoint's",
        ),
    ),
    ("model", "emb_dim", dict(type=int, help="width (nanoGPT's and GPT-2's n_embd)")),
    ("model", "n_heads", dict(type=int, help="attention heads (n_head)")),
    ("model", "n_layers", dict(type=int, help="blocks (n_layer)")),
    (
        "model",
        "drop_rate",
        dict(type=float, help="dropout on the embeddings and shortcuts (GPT-2's resid_pdrop and embd_pdrop)"),
    ),
    (
        "model",
        "attn_drop_rate",
        dict(
            type=float,
            help="dropout on the attention weights (attn_pdrop); default "
            "--drop-rate. On CPU any attention dropout halves the speed",
        ),
    ),
    ("model", "qkv_bias", dict(action=argparse.BooleanOptionalAction, help="biases on q, k, v (GPT-2 has them)")),
    (
        "model",
        "tie_embeddings",
        dict(action=argparse.BooleanOptionalAction, help="share the head with the token embedding (GPT-2 does)"),
    ),
    (
        "lora",
        "lora_rank",
        dict(
            type=int,
            help="train LoRA adapters of this rank (16 is the textbook's) on the frozen "
            "--init model instead of every weight",
        ),
    ),
    (
        "lora",
        "lora_alpha",
        dict(type=float, help="scale the adapters' update by alpha / rank (default: the rank, a scale of 1)"),
    ),
    ("lora", "lora_dropout", dict(type=float, help="dropout on the adapters' input (default: 0)")),
    (
        "lora",
        "lora_targets",
        dict(
            nargs="+",
            choices=list(TARGETS),
            help="the projections that get adapters: qkv and "
            "out_proj (attention), fc and proj (feed-forward), head (default: all but head)",
        ),
    ),
    (
        "lora",
        "lora_base_dtype",
        dict(
            choices=list(BASE_DTYPES),
            help="keep the frozen base in float32, bfloat16 or int8; the adapters train in float32 (default: float32)",
        ),
    ),
    ("train", "out", dict(help="run folder: checkpoints last/ and best/, run.toml, metrics.jsonl, loss.png")),
    (
        "train",
        "batch_size",
        dict(
            type=int,
            help="sequences per optimizer step over ALL processes (the global batch; "
            "nanoGPT's batch_size x gradient_accumulation_steps x processes)",
        ),
    ),
    (
        "train",
        "micro_batch_size",
        dict(
            type=int,
            help="sequences per forward pass per process; gradients accumulate "
            "up to --batch-size (default: batch / processes)",
        ),
    ),
    (
        "train",
        "stride",
        dict(
            type=int,
            help="tokens between window starts; 1 puts a window at every token, like "
            "nanoGPT's random offsets (default with --init: the context length)",
        ),
    ),
    (
        "train",
        "optimizer",
        dict(
            choices=list(OPTIMIZERS),
            help="adamw, or muon: Muon on the blocks' matrices and "
            "AdamW on embeddings, head, biases and norms, at one learning rate",
        ),
    ),
    ("train", "lr", dict(type=float, help="peak learning rate (nanoGPT's learning_rate)")),
    ("train", "min_lr_ratio", dict(type=float, help="the cosine ends at lr x this (nanoGPT's min_lr / learning_rate)")),
    ("train", "warmup_steps", dict(type=int, help="linear warmup steps (nanoGPT's warmup_iters)")),
    (
        "train",
        "schedule",
        dict(
            choices=list(SCHEDULES),
            help="after the warmup: cosine to the floor, or wsd "
            "(warmup-stable-decay): constant, then a line to the floor over the cooldown",
        ),
    ),
    ("train", "cooldown_fraction", dict(type=float, help="with --schedule wsd: the share of the run spent decaying")),
    ("train", "weight_decay", dict(type=float, help="AdamW weight decay, on matrices only")),
    (
        "train",
        "dropout_from_epoch",
        dict(
            type=float,
            help="keep the model's dropout off until the run has seen "
            "this many epochs of the training data; 0: from the first step "
            "(0 with --init)",
        ),
    ),
    (
        "train",
        "dropout_double_for_epochs",
        dict(
            type=float,
            help="a run that will see at least this many epochs "
            "(judged when its dropout switches on) runs every dropout at twice "
            "the model's rate (never with --init)",
        ),
    ),
    ("train", "beta1", dict(type=float, help="AdamW beta1")),
    ("train", "beta2", dict(type=float, help="AdamW beta2")),
    ("train", "grad_clip", dict(type=float, help="clip the gradient norm to this; 0 turns clipping off")),
    (
        "train",
        "ema_decay",
        dict(
            type=float,
            help="evaluate and save a moving average of the weights with this decay "
            "per step; 0 turns it off (a new model: 0.99; 0 with --init)",
        ),
    ),
    ("train", "pos_init", dict(choices=["gpt2", "sinusoidal"], help="a new model's position table")),
    ("train", "max_steps", dict(type=int, help="stop after this many optimizer steps (nanoGPT's max_iters)")),
    ("train", "max_tokens", dict(type=int, help="stop after this many training tokens")),
    (
        "train",
        "epochs",
        dict(
            type=float,
            help="stop after this many epochs; an epoch is as many tokens as the "
            "training split holds. Default on your own text: 1",
        ),
    ),
    (
        "train",
        "time_budget",
        dict(
            type=float,
            metavar="SECONDS",
            help="stop after this many seconds of training. Default on the embedded corpus: 300",
        ),
    ),
    ("train", "eval_interval", dict(type=int, help="evaluate and save last/ (and best/) every N steps")),
    (
        "train",
        "loggers",
        dict(
            flag="--logger",
            nargs="+",
            choices=list(LOGGERS),
            help="also log what metrics.jsonl records to TensorBoard (runs/NAME/tensorboard/), Weights & Biases "
            "(runs/NAME/wandb/; offline without an API key), MLflow ($MLFLOW_TRACKING_URI, else runs/NAME/mlruns) "
            "and/or metrics.csv",
        ),
    ),
    (
        "train",
        "eval_tokens",
        dict(
            type=int,
            metavar="N",
            help="score a seeded subset of about N validation tokens at "
            "each evaluation (the same subset each time) and the whole split at the end "
            "(default: the whole split each time)",
        ),
    ),
    ("train", "log_interval", dict(type=int, help="print a log line and record metrics every N steps")),
    ("train", "sample_tokens", dict(type=int, help="characters of sample text at each evaluation (0: none)")),
    (
        "train",
        "dtype",
        dict(
            choices=list(DTYPES),
            help="autocast dtype (default auto: bfloat16 where the device has bfloat16 arithmetic, else float32)",
        ),
    ),
    ("train", "compile", dict(action=argparse.BooleanOptionalAction, help="torch.compile the model and loss")),
    ("train", "fsdp", dict(action=argparse.BooleanOptionalAction, help="shard the model with FSDP2 (under torchrun)")),
    (
        "train",
        "activation_checkpointing",
        dict(
            action=argparse.BooleanOptionalAction,
            help="recompute each block's activations in the backward pass to save memory",
        ),
    ),
    ("train", "seed", dict(type=int, help="seeds the weights, the window order and dropout")),
    ("train", "device", dict(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")),
    ("train", "progress", dict(flag="--no-progress", action="store_false", help="no progress bars")),
]


def add_settings(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """Every setting of SETTINGS as an option (or `only` those named)."""
    groups = {
        "data": parser.add_argument_group("data"),
        "model": parser.add_argument_group("model"),
        "lora": parser.add_argument_group("LoRA (with --init)"),
        "train": parser.add_argument_group("optimisation, limits and reporting"),
    }
    for section, name, spec in SETTINGS:
        if only is not None and name not in only:
            continue
        spec = dict(spec)
        flag = spec.pop("flag", f"--{name.replace('_', '-')}")
        default = DEFAULTS[name]
        shown = "the preset's" if default is None and section == "model" else default
        spec["help"] = f"{spec['help']} (default: {shown})" if shown is not None else spec["help"]
        groups[section].add_argument(flag, dest=name, default=argparse.SUPPRESS, **spec)


def cmd_eval_task(args: argparse.Namespace) -> None:
    """gptlab eval --task NAME --data FILE: a benchmark in its published format (inference/benchmarks.py)."""
    import torch

    from ..inference.benchmarks import TASKS, score
    from ..loading import load_model
    from ..training.report_card import add_benchmark
    from ..training.runtime import pick_device

    if not args.data or len(args.data) != 1:
        raise UserError(f"--task {args.task} scores one file in the task's published format; give it with --data FILE")
    ignored = [
        flag
        for flag, given in (
            ("--include", args.include),
            ("--exclude", args.exclude),
            ("--quantize", args.quantize),
            ("--cache-dir", args.cache_dir),
            ("--accept-data-change", args.accept_data_change),
        )
        if given
    ]
    if ignored:
        raise UserError(f"{ignored[0]} does not apply to --task {args.task}; drop it")
    model, tokenizer = load_model(args.checkpoint, device=pick_device(args.device), dtype=getattr(torch, args.dtype))
    result = score(model, tokenizer, TASKS[args.task](args.data[0]), args.task)
    print(f"{args.checkpoint} on {args.task} ({args.data[0]}): {result.format()}")
    card = add_benchmark(Path(args.checkpoint), args.task, args.data[0], result.format())
    if card:
        print(f"added to {card}")


def cmd_prepare(args: argparse.Namespace) -> None:
    options = {name: value for name, value in vars(args).items() if name in PREPARED_FIXES and name != "data"}
    prepare(args.data, args.out, progress=args.progress, **options)


def cmd_train(args: argparse.Namespace) -> None:
    options = {name: value for name, value in vars(args).items() if name in DEFAULTS}
    result = train(
        args.config, resume=args.resume, overwrite=args.overwrite, accept_data_change=args.accept_data_change, **options
    )
    if not result.is_main:
        return
    out = result.out_dir
    print(
        f"stopped by {result.stopped_by} after {result.state.step:,} steps, {result.state.tokens_seen:,} tokens, "
        f"{result.state.elapsed:.0f} s"
    )
    print(f"validation: {result.final_eval.format()}")
    print(
        f"checkpoints: {out / 'last'} and {out / 'best'}; settings: {out / 'run.toml'}; "
        f"metrics: {out / 'metrics.jsonl'}; plot: {out / 'loss.png'}"
    )


def cmd_eval(args: argparse.Namespace) -> None:
    if args.task:
        cmd_eval_task(args)
        return
    report = evaluate(
        args.checkpoint,
        args.data,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        include=args.include or [],
        exclude=args.exclude or [],
        invalid_utf8=args.invalid_utf8,
        cache_dir=args.cache_dir,
        accept_data_change=args.accept_data_change,
        text_field=args.text_field,
    )
    print(f"{args.checkpoint} on {report.scored}:")
    print(report.result.format())


def cmd_demo(args: argparse.Namespace) -> None:
    """Train the default model on the embedded corpus for a few minutes, then sample from it."""
    from ..inference.generate import GenerationOptions, generate_text
    from ..loading import load_model

    out = Path(args.out)
    print(f"Training gptlab's default model on Python's bundled documentation for {args.time_budget:.0f} s...")
    # a demo run replaces the previous demo run, never other files
    train(out=str(out), time_budget=args.time_budget, eval_interval=100000, overwrite=(out / RUN_MARKER).is_file())
    model, tokenizer = load_model(out / "best")
    prompts = ["The ", "def ", "A list "]
    options = GenerationOptions(max_new_tokens=200, temperature=0.8, top_k=40, seed=0)
    print("\nSamples from the trained model (temperature 0.8, top-k 40, seed 0):")
    for prompt, text in zip(prompts, generate_text(model, tokenizer, prompts, options)):
        print(f"--- {prompt!r}\n{prompt}{text}")
    print(
        f"\nNext: gptlab generate --checkpoint {out / 'best'} --prompt 'The '   |   "
        f"gptlab eval --checkpoint {out / 'best'}"
    )


def add_parsers(commands) -> None:
    prep = add_command(
        commands,
        "prepare",
        description="Tokenize files, folders or globs once into a token cache "
        "(the format `gptlab train` keeps its own caches in), with the tokenizer and split a new model "
        "would get unless told otherwise. `gptlab train --prepared CACHE` then trains from it without "
        "reading the sources, so no process of a torchrun job waits for another to tokenize. A "
        "cache of unchanged sources is reused; an interrupted prepare goes on at the document where its "
        "last checkpoint (every 64M characters) left it.",
    )
    prep.add_argument("--data", nargs="+", required=True, metavar="PATH", help="files, folders or glob patterns")
    prep.add_argument("--out", required=True, metavar="CACHE", help="the folder to write the token cache to")
    prep.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    add_settings(prep, only={"include", "exclude", "invalid_utf8", "text_field", "tokenizer", "merges", "val_fraction"})
    prep.set_defaults(run=cmd_prepare)

    tr = add_command(
        commands,
        "train",
        description="Train a GPT model. Settings come from the defaults, then --config FILE.toml, then the options "
        "typed here. With no limit, a run on the embedded corpus trains for 300 s and a run on your own "
        "text for one epoch. --resume continues the run in --out with its own settings (run.toml); "
        "only limits, intervals, device, micro-batch size, progress, cache folder and --compile may "
        "change.",
    )
    tr.add_argument(
        "--config",
        metavar="FILE.toml",
        help="a recipe (see recipes/) or a run's run.toml; the options typed here override it",
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    tr.add_argument("--overwrite", action="store_true", help="replace an earlier gptlab run in --out")
    tr.add_argument(
        "--accept-data-change",
        action="store_true",
        help="with --resume: go on although files of the "
        "run's data were added, removed or modified since it started (recorded in the run's data.json)",
    )
    add_settings(tr)
    tr.set_defaults(run=cmd_train, config=None)

    ev = add_command(commands, "eval")
    ev.add_argument(
        "--task",
        choices=list(TASKS),
        help="score a benchmark in its published format instead, as lm-eval scores it: hellaswag and arc "
        "(acc, acc_norm; hellaswag_val.jsonl, ARC-Easy-Test.jsonl) or lambada (acc, perplexity; lambada_test.jsonl)",
    )
    ev.add_argument(
        "--checkpoint", required=True, help="a gptlab checkpoint (e.g. runs/NAME/best) or a Hugging Face GPT-2 folder"
    )
    ev.add_argument(
        "--data",
        nargs="+",
        help="score the whole of these files, folders or globs (default: the "
        "held-out split of the data the checkpoint's run trained on)",
    )
    ev.add_argument("--include", action="append", metavar="GLOB", help="with --data folders: only matching files")
    ev.add_argument("--exclude", action="append", metavar="GLOB", help="with --data folders: leave out matching files")
    ev.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    ev.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    ev.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype")
    ev.add_argument("--quantize", choices=["int8", "int4"], help="quantize the linear layers' weights (CPU)")
    ev.add_argument(
        "--accept-data-change",
        action="store_true",
        help="without --data: score the run's held-out split although its data changed since the run started",
    )
    ev.add_argument("--cache-dir", help="token cache folder (default: under ~/.cache/gptlab/tokens)")
    ev.add_argument(
        "--text-field",
        default="text",
        metavar="FIELD",
        help="with --data files of records (.jsonl, "
        ".json, .parquet): the field each document's text is in (default: text)",
    )
    ev.add_argument(
        "--replace-invalid-utf8",
        dest="invalid_utf8",
        action="store_const",
        const="replace",
        default="strict",
        help="read invalid UTF-8 bytes as U+FFFD instead of failing",
    )
    ev.set_defaults(run=cmd_eval)

    demo = add_command(commands, "demo")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--time-budget", type=float, default=180.0, help="seconds of training (default 180)")
    demo.set_defaults(run=cmd_demo)
