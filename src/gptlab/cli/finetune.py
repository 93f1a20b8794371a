"""`gptlab finetune instruct|classify`, `gptlab classify` and `gptlab merge-lora`: argument parsing over
gptlab.finetune's functions."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..data import DataError
from ..finetune.classify import classify_texts
from ..finetune.instruct import SAMPLES_FILE
from ..finetune.lora import merge_adapter_checkpoint
from ..finetune.pipeline import SCORES_FILE, TASKS, finetune
from ..finetune.records import read_records
from ..finetune.templates import TEMPLATES
from ..loading import load_classifier
from ..training.runtime import pick_device
from .common import add_command
from .train import DEFAULTS, add_settings

# The `gptlab train` settings that a fine-tune takes: none that would pick the data or the model's shape.
FINETUNE_SETTINGS = {
    "init",
    "context_length",
    "drop_rate",
    "attn_drop_rate",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "lora_base_dtype",
    "out",
    "batch_size",
    "micro_batch_size",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "max_steps",
    "max_tokens",
    "epochs",
    "time_budget",
    "eval_interval",
    "log_interval",
    "sample_tokens",
    "dtype",
    "compile",
    "seed",
    "device",
    "progress",
}


def cmd_finetune(args: argparse.Namespace) -> None:
    task_fields = {field.name for field in dataclasses.fields(TASKS[args.task])}
    options = {name: value for name, value in vars(args).items() if name in DEFAULTS or name in task_fields}
    result = finetune(args.task, args.config, resume=args.resume, overwrite=args.overwrite, **options)
    run = result.run
    if not run.is_main:
        return
    out = run.out_dir
    print(f"stopped by {run.stopped_by} after {run.state.step:,} steps, {run.state.elapsed:.0f} s")
    print(f"validation: {run.final_eval.format()}")
    for split, score in result.scores.items():
        print(f"{split}: {score.format()}")
    print(f"checkpoints: {out / 'last'} and {out / 'best'}; metrics: {out / 'metrics.jsonl'}")
    if (out / "last" / "adapter_config.json").is_file():
        print(
            f"the LoRA adapter alone: {out / 'best'}/adapter.safetensors (gptlab convert --to-hf --adapter "
            f"{out / 'best'} DIR writes it for PEFT); the checkpoint's model has it merged"
        )
    if args.task == "instruct":
        print(f"responses at each evaluation: {out / SAMPLES_FILE}")
    else:
        print(f"scores: {out / SCORES_FILE}; label texts with: gptlab classify --checkpoint {out / 'best'} --text ...")


def read_texts(path: Path) -> tuple[list[str], list[str | None]]:
    """Texts to classify and their labels where the file gives them: a CSV, JSONL or JSON file's `text` (and
    `label`) fields, or any other file's non-empty lines."""
    if path.suffix.lower() in (".csv", ".jsonl", ".json"):
        records = read_records(path)
        missing = next((place for place, record in records if not isinstance(record.get("text"), str)), None)
        if missing:
            raise DataError(f"{path}: {missing} has no string 'text' field")
        return [r["text"] for _, r in records], [
            None if r.get("label") is None else str(r["label"]) for _, r in records
        ]
    try:
        lines = [line for line in path.read_text("utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path} as UTF-8 text ({error})") from None
    return lines, [None] * len(lines)


def cmd_classify(args: argparse.Namespace) -> None:
    if not args.text and not args.file:
        raise DataError('give the texts to classify: --text "..." (repeatable) or --file FILE')
    texts, labels = list(args.text or []), [None] * len(args.text or [])
    if args.file:
        file_texts, file_labels = read_texts(args.file)
        texts, labels = texts + file_texts, labels + file_labels
    classifier = load_classifier(args.checkpoint, pick_device(args.device))
    predictions = classify_texts(classifier, texts, args.batch_size)
    for text, (label, probability) in zip(texts, predictions):
        print(f"{label}\t{probability:.4f}\t{' '.join(text.split())[:100]}")
    known = [(label, predicted) for label, (predicted, _) in zip(labels, predictions) if label is not None]
    if known:
        correct = sum(label == predicted for label, predicted in known)
        print(f"accuracy: {correct / len(known):.2%} ({correct:,} of {len(known):,} labelled texts)")


def cmd_merge_lora(args: argparse.Namespace) -> None:
    print(merge_adapter_checkpoint(args.adapter, args.out, args.base, force=args.force).format())


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What every fine-tune takes: resume and overwrite, a recipe, and the `gptlab train` settings that apply."""
    parser.add_argument(
        "--config", metavar="FILE.toml", help="a recipe or a run's run.toml; options typed here override it"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier gptlab run in --out")
    parser.add_argument("--val-data", metavar="FILE", help="validation records (default: --val-fraction of --data)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        help="the share of --data held out for validation, chosen at random from the seed (default 0.1)",
    )
    add_settings(parser, only=FINETUNE_SETTINGS)
    parser.set_defaults(run=cmd_finetune, config=None)


def add_parsers(commands) -> None:
    tune = add_command(commands, "finetune")
    tasks = tune.add_subparsers(dest="task", required=True)

    instruct = tasks.add_parser(
        "instruct",
        help="instruction tuning: the loss on the responses only",
        description="Fine-tune on instructions: JSON or JSONL records with instruction, optional input and output "
        '(Alpaca\'s fields), or chats: {"messages": [{"role": "system"|"user"|"assistant", '
        '"content": ...}]}. The loss is taken on the responses and the end-of-text after each. '
        "Every `gptlab train` option that does not choose the data or the model's shape applies.",
    )
    instruct.add_argument("--data", metavar="FILE", help="the training records (.json or .jsonl)")
    instruct.add_argument(
        "--template", choices=list(TEMPLATES), help="the prompt template, stored in the checkpoint (default: alpaca)"
    )
    instruct.add_argument(
        "--pack",
        action="store_true",
        default=None,
        help="pack several examples into each window instead of padding one per row",
    )
    instruct.add_argument(
        "--long",
        choices=["truncate", "drop"],
        help="what to do with an example longer than the context (default: truncate)",
    )
    add_run_arguments(instruct)

    classify = tasks.add_parser(
        "classify",
        help="classification: a new head of one row per label",
        description="Fine-tune a classifier: CSV, JSONL or JSON records with text and label. The output head is "
        "replaced by one row per label, read at each text's last token.",
    )
    classify.add_argument("--data", metavar="FILE", help="the training records (.csv, .jsonl or .json)")
    classify.add_argument("--test-data", metavar="FILE", help="test records (default: --test-fraction of --data)")
    classify.add_argument(
        "--test-fraction",
        type=float,
        help="the share of --data held out for the test scores (default 0.2; 0: no test split)",
    )
    classify.add_argument(
        "--train-blocks",
        help="train only the last N blocks, the final norm and the head (the textbook trains 1), or all (default: all)",
    )
    add_run_arguments(classify)

    label = add_command(commands, "classify")
    label.add_argument("--checkpoint", type=Path, required=True, help="the classifier (e.g. runs/NAME/best)")
    label.add_argument("--text", action="append", help="a text to classify (repeatable)")
    label.add_argument(
        "--file",
        type=Path,
        help="texts to classify: a .csv, .jsonl or .json file's text field "
        "(with labels: the accuracy too), or one text per line of any other file",
    )
    label.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    label.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    label.set_defaults(run=cmd_classify)

    merge = add_command(commands, "merge-lora")
    merge.add_argument("--adapter", type=Path, required=True, help="the adapter folder fine-tuning wrote")
    merge.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write (new or empty)")
    merge.add_argument(
        "--base",
        type=Path,
        help="the base checkpoint (gptlab or Hugging Face GPT-2 folder); default: the one the adapter records",
    )
    merge.add_argument("--force", action="store_true", help="replace --out even if it holds files")
    merge.set_defaults(run=cmd_merge_lora)
