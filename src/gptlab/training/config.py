"""What a training run is: every setting of `gptlab train` in one dataclass, read from TOML recipes,
written back into the run folder as `run.toml`, and the rule for what a resumed run may change.

A run's settings come in layers, each overriding the one before:
    the defaults below  →  those of a new model, or of fine-tuning when the run starts from --init  →
    a --config FILE.toml  →  the options typed on the command line
The resolved settings are written to `run.toml` in the run folder (and into each checkpoint), and that file
reproduces the run when passed back with --config. A recipe is such a file with only some keys.

TOML keys are the command line's option names with underscores (`batch_size` for --batch-size). They may
sit at the top level or under the tables [data], [model] and [train], which is how run.toml writes them.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

RUN_FILE = "run.toml"

# With no limit given, a run on the embedded corpus stops after this many seconds (what `make demo` and the
# benchmarks use); a run on the user's own text stops after one epoch.
EMBEDDED_TIME_BUDGET = 300.0
DEFAULT_EPOCHS = 1.0
LIMITS = ("max_steps", "max_tokens", "epochs", "time_budget")
OPTIMIZERS = ("adamw", "muon")  # training/optimizers.py
SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "bfloat16", "float32")  # autocast; auto: runtime.training_dtype
LOGGERS = ("tensorboard", "wandb", "mlflow", "csv")  # tracking.LOGGER_CLASSES


DEFAULT_VAL_FRACTION = 0.1


class ConfigError(UserError):
    """A recipe file or a combination of settings that cannot be used; the message says what to change."""


@dataclass
class DataConfig:
    data: list[str] | None = None  # files, folders or glob patterns; None: the embedded corpus
    include: list[str] = field(default_factory=list)  # glob patterns a file in a folder must match
    exclude: list[str] = field(default_factory=list)  # glob patterns that leave a file out
    invalid_utf8: str = "strict"  # or "replace": read bad bytes as U+FFFD
    text_field: str = "text"  # files of records (.jsonl, .json, .parquet): the field each document is in
    val_fraction: float | None = None  # the held-out share of the joined text's characters, at its end (0.1)
    val_data: list[str] | None = None  # validation files instead: then every file of data is trained on
    tokenizer: str = "char"  # "char", "gpt2" (a new model gets gpt2 with 128 merges: NEW_MODEL_DEFAULTS) or a
    # folder `gptlab tokenizer train` wrote
    merges: int | None = None  # gpt2 only: keep GPT-2's first N merges
    cache_dir: str | None = None  # token cache folder (default: under ~/.cache/gptlab/tokens)
    prepared: str | None = None  # a token cache `gptlab prepare` wrote: trained from, no source read

    @property
    def held_out(self) -> float:
        """The share of the text held out for validation: val_fraction, 0.1 unless set."""
        return DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ConfigError("--tokenizer must be char, gpt2 or a folder `gptlab tokenizer train` wrote, got ''")
        if self.merges is not None and self.tokenizer != "gpt2":
            raise ConfigError(
                f"--merges {self.merges} truncates GPT-2's BPE, but --tokenizer is {self.tokenizer}; drop one of them"
            )
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"--val-fraction must be between 0 and 1 (0.1 holds out the last 10%), got {self.val_fraction}"
            )
        if self.val_data and self.val_fraction is not None:
            raise ConfigError(
                "--val-data validates on its own files, so nothing of --data is held out: drop --val-fraction"
            )
        if self.invalid_utf8 not in ("strict", "replace"):
            raise ConfigError(f"invalid_utf8 must be strict or replace, got {self.invalid_utf8!r}")


@dataclass
class ModelConfig:
    model: str = "gpt2-micro"  # a preset of gptlab.config.PRESETS
    init: str | None = None  # start from this checkpoint's weights (gptlab or Hugging Face GPT-2 folder)
    vocab_size: int | None = None  # None: the preset's or the checkpoint's; others override them
    context_length: int | None = None
    emb_dim: int | None = None
    n_heads: int | None = None
    n_layers: int | None = None
    drop_rate: float | None = None
    attn_drop_rate: float | None = None
    qkv_bias: bool | None = None
    tie_embeddings: bool | None = None
    # LoRA (with --init): adapters of this rank train while the model's weights stay frozen. None: every
    # weight trains. The other LoRA settings need it (gptlab.finetune.hooks.lora_config checks them).
    lora_rank: int | None = None
    lora_alpha: float | None = None  # the update is scaled by alpha / rank; None: the rank (a scale of 1)
    lora_dropout: float | None = None  # on the adapters' input; None: 0
    lora_targets: list[str] | None = None  # of qkv, out_proj, fc, proj, head; None: all but head
    lora_base_dtype: str | None = None  # how the frozen base is kept: float32 (None), bfloat16 or int8


# The LoRA settings, lora_rank first: the fine-tuning layer's to act on (finetune/hooks.py).
LORA_SETTINGS = tuple(item.name for item in dataclasses.fields(ModelConfig) if item.name.startswith("lora_"))


@dataclass
class TrainConfig:
    """How the loop optimises, when it stops, and what it reports. The defaults, with NEW_MODEL_DEFAULTS,
    are the recipe for the embedded corpus (README, time to quality)."""

    out: str = "runs/default"
    batch_size: int = 16  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # sequences per forward pass per process (default: batch / world)
    # Every token starts a window: on a small corpus each epoch then sees the text at new offsets, which
    # generalises far better than fixed non-overlapping windows. None: context_length (no overlap).
    stride: int | None = 1
    # "muon": Muon on the blocks' matrices, AdamW on the rest, one learning rate (training/optimizers.py);
    # "adamw" everywhere. Fine-tuning (--init) uses AdamW.
    optimizer: str = "muon"
    lr: float = 8e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50
    # After the warmup: "cosine" from lr to the floor over the rest of the run, or "wsd" (warmup-stable-
    # decay): lr until the last cooldown_fraction of the run, then a straight line to the floor.
    schedule: str = "cosine"
    cooldown_fraction: float = 0.2
    weight_decay: float = 0.1
    # The model's dropout stays off until the run has seen this many epochs of the training data, then
    # runs at the model's rates: on a small corpus a short run underfits, and dropout only slows it, while a
    # long one overfits without it (README, time to quality). 0: dropout from the first step.
    dropout_from_epoch: float = 4.0
    # A run that will see the training data at least this many times runs its dropout at twice the model's
    # rates: the more passes over the same text, the more a model overfits. Judged once, when dropout
    # switches on, from the run's progress toward its limit (for a time budget, the speed so far; training/
    # dropout.py). None: never (a new model from scratch gets 18, NEW_MODEL_DEFAULTS).
    dropout_double_for_epochs: float | None = None
    # A new model's position table: "sinusoidal" (the original Transformer's code, scaled to GPT-2's init
    # RMS) skips the plateau where a character model otherwise spends a seventh of its 5 minutes; "gpt2"
    # is GPT-2's random init. A loaded model keeps its table.
    pos_init: str = "sinusoidal"
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    # Evaluate and save an exponential moving average of the weights with this decay per step (averaging.py).
    # 0: the weights themselves (a new model from scratch gets 0.99, NEW_MODEL_DEFAULTS).
    ema_decay: float = 0.0
    max_steps: int | None = None
    max_tokens: int | None = None
    epochs: float | None = None  # an epoch is as many tokens as the training split holds
    time_budget: float | None = None  # seconds of training
    eval_interval: int = 250
    eval_tokens: int | None = None  # in-run evaluations: a seeded subset of about this many tokens (None: all)
    loggers: list[str] = field(default_factory=list)  # besides metrics.jsonl: any of LOGGERS (tracking.py)
    log_interval: int = 20
    sample_tokens: int = 200
    # autocast dtype: "bfloat16", "float32", or "auto": bfloat16 where the device has bfloat16 arithmetic,
    # else float32 (runtime.training_dtype; a run records the dtype auto chose)
    dtype: str = "auto"
    compile: bool = False
    fsdp: bool = False
    activation_checkpointing: bool = False
    seed: int = 1337
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_interval", "log_interval", "warmup_steps"):
            value = getattr(self, name)
            if value < (0 if name == "warmup_steps" else 1):
                raise ConfigError(
                    f"--{dashed(name)} must be {'>= 0' if name == 'warmup_steps' else 'positive'}, got {value}"
                )
        for name in LIMITS + ("micro_batch_size", "stride", "eval_tokens"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{dashed(name)} must be positive, got {value}")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise ConfigError(f"--logger {unknown[0]} is not one gptlab writes; choose from {', '.join(LOGGERS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be {' or '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError(
                "--optimizer muon needs whole matrices, which --fsdp shards; use DDP (leave out --fsdp) or adamw"
            )
        if self.pos_init not in ("gpt2", "sinusoidal"):
            raise ConfigError(f"--pos-init must be gpt2 or sinusoidal, got {self.pos_init!r}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be {' or '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.cooldown_fraction <= 1:
            raise ConfigError(f"--cooldown-fraction must be in (0, 1], got {self.cooldown_fraction}")
        if not self.dropout_from_epoch >= 0:
            raise ConfigError(
                f"--dropout-from-epoch must be >= 0 (0: dropout from the first step), got {self.dropout_from_epoch}"
            )
        if self.dropout_double_for_epochs is not None and not self.dropout_double_for_epochs > 0:
            raise ConfigError(f"--dropout-double-for-epochs must be positive, got {self.dropout_double_for_epochs}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(
                f"--ema-decay must be in [0, 1) (0.99 averages about the last 100 steps, 0 turns "
                f"the average off), got {self.ema_decay}"
            )
        if self.ema_decay and self.fsdp:
            raise ConfigError("--ema-decay keeps whole weights, which --fsdp shards; leave out one of them")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


# A new model trained from scratch (no --init), measured on the embedded corpus (README, time to quality):
# GPT-2's byte-level BPE cut to its first 128 merges (vocabulary 385, 1.53 bytes a token) learns faster per
# second than characters and reads any text, a run long enough to pass over the text 18 times gains from
# twice the dropout, and an average of the weights scores better than the weights. They sit here rather
# than in the dataclasses so that a run.toml written before them still resumes as it ran.
NEW_MODEL_DEFAULTS = {"tokenizer": "gpt2", "merges": 128, "dropout_double_for_epochs": 18.0, "ema_decay": 0.99}

# Fine-tuning a pretrained model (--init) wants a rate about 50x lower than training from scratch, a short
# warmup, and windows that do not overlap (the text is usually large next to the model's context).
FINETUNE_DEFAULTS = {
    "lr": 6e-5,
    "warmup_steps": 20,
    "stride": None,
    "batch_size": 16,
    "weight_decay": 0.1,
    "optimizer": "adamw",
    "dropout_from_epoch": 0.0,
}

# What `--resume` lets the command line change: when and how often the run stops, reports and where it
# runs. Everything else would make the resumed run a different run.
RESUMABLE = frozenset(
    {
        *LIMITS,
        "eval_interval",
        "log_interval",
        "sample_tokens",
        "device",
        "micro_batch_size",
        "progress",
        "cache_dir",
        "compile",
        "loggers",
    }
)

SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def dashed(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def flat(self) -> dict:
        """Every setting by option name (underscored)."""
        return {
            name: value for section in SECTIONS for name, value in dataclasses.asdict(getattr(self, section)).items()
        }

    @classmethod
    def from_flat(cls, values: dict) -> "RunConfig":
        check_keys(values, "settings")
        parts = {}
        for section, kind in SECTIONS.items():
            names = {f.name for f in dataclasses.fields(kind)}
            parts[section] = kind(**{name: value for name, value in values.items() if name in names})
        return cls(**parts)

    def to_toml(self) -> str:
        lines = ["# gptlab run settings: `gptlab train --config THIS_FILE` repeats the run.", ""]
        for section in SECTIONS:
            lines.append(f"[{section}]")
            for name, value in dataclasses.asdict(getattr(self, section)).items():
                if value is not None:  # TOML has no null: an absent key means "not set"
                    lines.append(f"{name} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def option_names() -> list[str]:
    return [f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)]


def check_keys(values: dict, where: str) -> None:
    known = option_names()
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {name!r} in {where}{hint}")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def read_toml(path: str | Path) -> dict:
    """A recipe's settings, flattened: top-level keys and the keys of [data], [model] and [train]."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file; give the path of a .toml recipe (see recipes/)") from None
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path} is not valid TOML: {error}") from None
    values = {}
    for key, value in document.items():
        if key in SECTIONS and isinstance(value, dict):
            values.update(value)
        else:
            values[key] = value
    check_keys(values, f"--config {path}")
    check_types(values, f"--config {path}")
    return values


def check_types(values: dict, where: str) -> None:
    """A TOML value must have the option's type (an int is accepted where a float is wanted)."""
    annotations = {f.name: f.type for kind in SECTIONS.values() for f in dataclasses.fields(kind)}
    for name, value in values.items():
        wanted = annotations[name]
        if "list" in wanted:
            ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        elif "bool" in wanted:
            ok = isinstance(value, bool)
        elif "int" in wanted:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif "float" in wanted:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"{name} = {value!r} in {where} should be {wanted.replace(' | None', '')}")


def resolve(given: dict) -> RunConfig:
    """The settings of a new run from the values given (a recipe's, then the command line's)."""
    if given.get("init"):
        defaults = dict(FINETUNE_DEFAULTS)
    else:
        defaults = dict(NEW_MODEL_DEFAULTS)
        if "tokenizer" in given:  # --tokenizer gpt2 alone means GPT-2's whole BPE
            del defaults["merges"]
    if given.get("fsdp"):  # Muon and the average need whole matrices, which FSDP shards
        defaults["optimizer"] = "adamw"
        defaults.pop("ema_decay", None)
    return RunConfig.from_flat({**defaults, **given})


def resume_settings(saved: RunConfig, given: dict, model_shape: dict | None = None) -> RunConfig:
    """A resumed run's settings: the saved ones, with the changes that are safe to make. Any other value
    that differs from the run's is refused, naming the option and both values. `model_shape`: the run's
    model config, which is what a model setting the run left unset (None) came to."""
    values = saved.flat()
    actual = {
        **{k: v for k, v in (model_shape or {}).items() if values.get(k) is None},
        **{k: v for k, v in values.items() if v is not None or k not in (model_shape or {})},
    }
    for name, value in given.items():
        if name in RESUMABLE:
            values[name] = value
        elif name != "out" and value != actual.get(name):
            allowed = ", ".join(f"--{dashed(n)}" for n in sorted(RESUMABLE))
            raise ConfigError(
                f"--resume continues the run with its own settings, but --{dashed(name)} is "
                f"{value!r} here and {actual.get(name)!r} in the run; drop it (a resume may change "
                f"only {allowed}), or start a new run with another --out"
            )
    return RunConfig.from_flat(values)


def with_default_limit(cfg: RunConfig) -> tuple[RunConfig, str]:
    """The run with a limit filled in when none was given, and a note saying which limit applies and why."""
    loop = cfg.train
    if any(getattr(loop, name) is not None for name in LIMITS):
        return cfg, "as given"
    if cfg.data.data is None:
        limit, note = {"time_budget": EMBEDDED_TIME_BUDGET}, "the default on the embedded corpus"
    else:
        limit, note = {"epochs": DEFAULT_EPOCHS}, "the default on your own text"
    return dataclasses.replace(cfg, train=dataclasses.replace(loop, **limit)), (
        f"{note}; set --max-steps, --max-tokens, --epochs or --time-budget to choose"
    )
