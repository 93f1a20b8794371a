"""The whole job behind `gptlab finetune instruct` and `gptlab finetune classify`, as functions:

    from gptlab.finetune.pipeline import finetune
    finetune("instruct", init="models/gpt2", data="alpaca.json", out="runs/alpaca", epochs=2, lora_rank=16)
    finetune("classify", init="models/gpt2", data="sms.csv", out="runs/spam", train_blocks="1")
    finetune("instruct", out="runs/alpaca", resume=True, max_steps=500)

A fine-tune is a `gptlab train --init` run (the same settings, pipeline, loop, checkpoints, torchrun and
exact resume: training.pipeline.run_job with FinetuneRun as its kind) on a task's data instead of a token
stream. The task's own settings (its data files, template,
labels...) go into every checkpoint's config.json under "finetune", so that --resume continues with them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import CLASSIFIER_FIELD, ClassifierHead, give_classifier_head
from ..loading import load_classifier
from ..training import pipeline as training_pipeline
from ..training.config import ConfigError, RunConfig
from ..training.pipeline import RunParts, initial_model, resumed_model, run_job
from ..training.runtime import Runtime, TrainingError
from ..training.trainer import TrainResult
from .classify import (
    ClassificationEval,
    ClassificationSource,
    class_rows,
    evaluate_rows,
    freeze_for_classification,
    label_set,
    parse_train_blocks,
    read_labeled,
)
from .hooks import check_lora_head, finetune_hooks, lora_config, run_hooks
from .instruct import instruction_source, write_samples
from .records import split_off
from .templates import DEFAULT_TEMPLATE, get_template

SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class InstructTask:
    data: str  # JSON or JSONL: Alpaca records or chats
    val_data: str | None = None  # default: val_fraction of data
    val_fraction: float = 0.1
    template: str = DEFAULT_TEMPLATE
    pack: bool = False  # several examples per window instead of one padded row each
    long: str = "truncate"  # an example longer than the context: "truncate" or "drop"

    def __post_init__(self) -> None:
        get_template(self.template)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.long not in ("truncate", "drop"):
            raise ConfigError(f"--long must be truncate or drop, got {self.long!r}")


@dataclass(frozen=True)
class ClassifyTask:
    data: str  # CSV, JSONL or JSON with text and label
    val_data: str | None = None  # default: val_fraction of data
    test_data: str | None = None  # default: test_fraction of data
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # the textbook's 70 / 10 / 20 split
    train_blocks: str = "all"  # or N: only the last N blocks, the final norm and the head train

    def __post_init__(self) -> None:
        if not (
            0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise ConfigError(
                f"--val-fraction {self.val_fraction} and --test-fraction {self.test_fraction} must be "
                "fractions of the file that leave some of it for training"
            )


TASKS = {"instruct": InstructTask, "classify": ClassifyTask}


@dataclass
class FinetuneResult:
    run: TrainResult
    scores: dict[str, ClassificationEval]  # classification: the final model on train, validation and test


def task_settings(kind: type, given: dict, saved: dict | None) -> object:
    """The task's settings: those given, or on --resume the run's own (a given one that differs is refused)."""
    if saved is None:
        if not given.get("data"):
            raise ConfigError("give the training data: --data FILE")
        return kind(**given)
    saved = {name: value for name, value in saved.items() if name != "task"}
    for name, value in given.items():
        if value != saved.get(name):
            raise ConfigError(
                f"--resume continues the run with its own settings, but --{name.replace('_', '-')} is "
                f"{value!r} here and {saved.get(name)!r} in the run; drop it, or start a new run "
                "with another --out"
            )
    return kind(**saved)


def train(config: str | os.PathLike | RunConfig | None = None, **keywords) -> TrainResult:
    """Train as `gptlab train` does (gptlab.train): training.pipeline.train, whose keywords it takes, with
    fine-tuning's hooks, so that `init` with `lora_rank` trains LoRA adapters on a frozen base."""
    return training_pipeline.train(config, hooks_for=run_hooks, **keywords)


def finetune(
    task: str,
    config: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log=print,
    **options,
) -> FinetuneResult:
    """Fine-tune as `gptlab finetune TASK` does. `options`: the task's settings (InstructTask's or
    ClassifyTask's fields) and any `gptlab train` setting by its option name."""
    task_names = {f.name for f in dataclasses.fields(TASKS[task])}
    task_given = {name: options.pop(name) for name in list(options) if name in task_names and options[name] is not None}
    kind = FinetuneRun(task, task_given)
    result = run_job(
        kind,
        config,
        {name: value for name, value in options.items() if value is not None},
        resume=resume,
        overwrite=overwrite,
        accept_data_change=False,
        log=log,
    )
    return FinetuneResult(result, kind.scores)


@dataclass
class FinetuneRun:
    """A fine-tuning task as a kind of run (training.pipeline.RunKind): the task's settings, its data as the
    loop's source, fine-tuning's hooks, and for classification the final model's scores on every split."""

    task: str
    task_given: dict
    settings_of_task: InstructTask | ClassifyTask | None = None
    scored: dict = field(default_factory=dict)  # classification: the splits to score once the loop has ended
    scores: dict[str, ClassificationEval] = field(default_factory=dict)

    def settings(self, given: dict, meta: dict | None, out: Path) -> dict:
        kind = TASKS[self.task]
        if meta is not None:
            if "finetune" not in meta:
                raise TrainingError(
                    f"--resume: {out / 'last'} is not a checkpoint of a fine-tune; continue it with the "
                    "command that started it"
                )
            self.settings_of_task = task_settings(kind, self.task_given, meta["finetune"])
            return given
        self.settings_of_task = task_settings(kind, self.task_given, None)
        if not given.get("init"):
            raise ConfigError(
                "fine-tuning starts from a trained model: add --init CHECKPOINT (a gptlab checkpoint "
                "or a Hugging Face GPT-2 folder)"
            )
        return {**given, "data": [self.settings_of_task.data]}

    def parts(
        self, run: RunConfig, note: str, given: dict, resume: bool, accept_data_change: bool, runtime: Runtime, log
    ) -> RunParts:
        lora_config(run)  # refuse impossible LoRA settings before a model is read
        task, settings, out = self.task, self.settings_of_task, Path(run.train.out)
        say = log if runtime.is_main else (lambda line: None)
        init_state = None
        if resume:
            model_cfg, tokenizer, init_state = resumed_model(run)
        else:
            model_cfg, tokenizer, init_state = initial_model(run, given)
            if task == "classify":  # the new head is the model's own, whatever the base shared
                model_cfg = model_cfg.replace(tie_embeddings=False)
            check_lora_head(run, model_cfg)
        say(f"fine-tuning {run.model.init} ({task}): {json.dumps(dataclasses.asdict(settings))}")
        say(f"settings: {out / 'run.toml'} (limits: {note})")
        meta = {"finetune": {"task": task, **dataclasses.asdict(settings)}}
        make = instruct_job if task == "instruct" else classify_job
        source, hooks, self.scored = make(settings, run, model_cfg, tokenizer, meta, say)
        # The loop's own sample (a continuation of nothing) means nothing here: instruct answers prompts instead.
        loop = dataclasses.replace(run.train, sample_tokens=0)
        described = f"finetune {task} of {run.model.init} on {settings.data}"
        return RunParts(run, model_cfg, tokenizer, init_state, source, hooks, described, loop)

    def finish(self, result: TrainResult, parts: RunParts, runtime: Runtime) -> None:
        """Classification: the final model's scores on each split, in scores.json."""
        if not (self.scored and runtime.is_main):
            return
        out, loop = result.out_dir, parts.loop
        classifier = load_classifier(out / "last", runtime.device)
        self.scores = {
            name: evaluate_rows(
                classifier.model,
                rows,
                parts.tokenizer.eot_id,
                loop.micro_batch_size or loop.batch_size,
                Runtime(runtime.device),
            )
            for name, rows in self.scored.items()
            if rows
        }
        (out / SCORES_FILE).write_text(json.dumps({k: s.metrics() for k, s in self.scores.items()}, indent=2) + "\n")


def instruct_job(settings: InstructTask, run: RunConfig, model_cfg, tokenizer, meta: dict, say):
    """The loop's data and hooks for instruction tuning (and no splits to score at the end)."""
    source = instruction_source(
        tokenizer,
        settings.data,
        settings.val_data,
        settings.val_fraction,
        settings.template,
        model_cfg.context_length,
        run.train.batch_size,
        settings.long,
        settings.pack,
        run.train.seed,
        run.train.sample_tokens,
        log=say,
    )
    meta["chat_template"] = settings.template
    return source, dataclasses.replace(finetune_hooks(run, meta, log=say), after_eval=write_samples), {}


def classify_job(settings: ClassifyTask, run: RunConfig, model_cfg, tokenizer, meta: dict, say):
    """The loop's data and hooks for classification, and the splits to score the final model on."""
    blocks = parse_train_blocks(settings.train_blocks, model_cfg.n_layers)
    lora = lora_config(run)
    if blocks is not None and lora is not None:
        raise ConfigError(
            "with LoRA the adapters and the new head train, not whole blocks; drop --train-blocks or the LoRA options"
        )
    if lora is not None and "head" in lora.targets:
        raise ConfigError(
            "--lora-targets head: a classifier's new head trains in full beside the adapters; leave head out"
        )
    splits = classification_splits(settings, run.train.seed)
    labels = label_set(splits["train"], {k: v for k, v in splits.items() if k != "train"}, settings.data)
    rows = {name: class_rows(tokenizer, items, labels, model_cfg.context_length) for name, items in splits.items()}
    say(f"labels: {', '.join(labels)}; " + ", ".join(f"{len(r):,} {name}" for name, r in rows.items()) + " texts")
    source = ClassificationSource(
        rows["train"], rows["validation"], tokenizer.eot_id, model_cfg.context_length, run.train.batch_size
    )
    meta[CLASSIFIER_FIELD] = ClassifierHead(tuple(labels)).to_dict()
    hooks = finetune_hooks(
        run,
        meta,
        lambda model: freeze_for_classification(give_classifier_head(model, len(labels)), blocks),
        keep_training=("out_head",),
        log=say,
    )
    return source, hooks, rows


def classification_splits(settings: ClassifyTask, seed: int) -> dict[str, list]:
    """train, validation and test texts: from their files, or split off the training file (seeded)."""
    train = read_labeled(settings.data)
    if settings.val_data:
        val = read_labeled(settings.val_data)
    else:
        train, val = split_off(train, settings.val_fraction, seed, settings.data, "--val-fraction")
    if settings.test_data:
        test = read_labeled(settings.test_data)
    elif settings.test_fraction:
        # of the whole file, as --val-fraction is: 70 / 10 / 20 by default
        of_rest = settings.test_fraction / (1 - (0 if settings.val_data else settings.val_fraction))
        train, test = split_off(train, of_rest, seed + 1, settings.data, "--test-fraction")
    else:
        test = []
    return {"train": train, "validation": val, "test": test}
