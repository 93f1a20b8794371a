"""`gptlab train`, `gptlab eval` and `gptlab demo`: argument parsing over gptlab.train and gptlab.evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..finetune.hooks import BASE_DTYPES
from ..finetune.lora import TARGETS
from ..finetune.pipeline import train
from ..inference.benchmarks import TASKS
from ..training.config import SETTINGS, resolve
from ..training.pipeline import PREPARED_FIXES, evaluate, prepare
from ..training.state import RUN_MARKER
from .common import add_command

DEFAULTS = resolve({}).flat()
# The choices of settings that the fine-tuning layer defines (training cannot import them).
PLUGIN_CHOICES = {"lora_targets": TARGETS, "lora_base_dtype": BASE_DTYPES}
GROUPS = {"data": "data", "model": "model", "lora": "LoRA (with --init)", "train": "optimisation, limits and reporting"}


def add_settings(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """Every setting of the settings table (training/config.SETTINGS) as an option, or `only` those named.

    Defaults are shown as a new model gets them (resolve), so the help cannot drift from what runs. Every
    option is parsed with default SUPPRESS: the namespace then holds only what was typed, which is what
    overrides a recipe and what a resume must check."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for row in SETTINGS:
        if only is not None and row.name not in only:
            continue
        spec = dict(row.cli)
        flag = spec.pop("flag", f"--{row.name.replace('_', '-')}")
        if "action" not in spec:
            if row.kind is bool:
                spec["action"] = argparse.BooleanOptionalAction
            elif row.kind is list:
                spec["nargs"] = "+"
            elif row.kind is not str:
                spec["type"] = row.kind
        choices = row.choices or PLUGIN_CHOICES.get(row.name)
        if choices:
            spec["choices"] = list(choices)
        if row.metavar:
            spec["metavar"] = row.metavar
        group = "lora" if row.name.startswith("lora_") else row.section
        default = DEFAULTS[row.name]
        shown = "the preset's" if default is None and group == "model" else default
        spec["help"] = f"{row.help} (default: {shown})" if shown is not None else row.help
        groups[group].add_argument(flag, dest=row.name, default=argparse.SUPPRESS, **spec)


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
