"""What a training run is: every setting of `gptlab train` in one dataclass, read from TOML recipes,
written back into the run folder as `run.toml`, and the rule for what a resumed run may change.

A run's settings come in layers, each overriding the one before:
    the defaults below  →  those of a new model, or of fine-tuning when the run starts from --init  →
    a --config FILE.toml  →  the options typed on the command line
The resolved settings are written to `run.toml` in the run folder (and into each checkpoint), and that file
reproduces the run when passed back with --config: it carries `schema = 2`, so a key it leaves out is unset,
not defaulted. A recipe is a file with only some keys and no schema.

TOML keys are the command line's option names with underscores (`batch_size` for --batch-size). They may
sit at the top level or under the tables [data], [model] and [train], which is how run.toml writes them.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PRESETS
from ..errors import UserError

RUN_FILE = "run.toml"
# run.toml's format. Schema 2 says `schema = 2` and holds every setting that is set, so a key it leaves out
# is unset (None): it is read as it is, through no default. A file without `schema` (a recipe, or a run
# written before gptlab recorded one) leaves the settings it lacks to the defaults (resolve).
SCHEMA = 2

# With no limit given, a run on the embedded corpus stops after this many seconds (what `make demo` and the
# benchmarks use); a run on the user's own text stops after one epoch.
EMBEDDED_TIME_BUDGET = 300.0
DEFAULT_EPOCHS = 1.0
LIMITS = ("max_steps", "max_tokens", "epochs", "time_budget")
OPTIMIZERS = ("adamw", "muon")  # training/optimizers.py
SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "bfloat16", "float32")  # autocast; auto: runtime.training_dtype
LOGGERS = ("tensorboard", "wandb", "mlflow", "csv")  # tracking.LOGGER_CLASSES
POSITION_INITS = ("gpt2", "sinusoidal")


DEFAULT_VAL_FRACTION = 0.1


class ConfigError(UserError):
    """A recipe file or a combination of settings that cannot be used; the message says what to change."""


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


def setting(
    default=None,
    help: str = "",
    *,
    factory: Callable | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    cli: dict | None = None,
    resumable: bool = False,
):
    """A run setting: a dataclass field whose metadata is its row of the settings table (SETTINGS): the
    help, the choices, argparse's metavar and any other argparse keywords (`cli`: flag, action, const), and
    whether --resume may change it. Its type, default and TOML key come from the field itself."""
    metadata = {"help": help, "choices": choices, "metavar": metavar, "cli": cli or {}, "resumable": resumable}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    data: list[str] | None = setting(
        None,
        "files, folders or glob patterns to train on; a folder is read recursively (hidden files skipped, binary "
        "files reported). Default: the embedded corpus, Python's bundled documentation",
        metavar="PATH",
    )
    include: list[str] = setting(
        help="read only files in --data folders that match (repeatable)", factory=list, metavar="GLOB",
        cli={"action": "append"},
    )  # fmt: skip
    exclude: list[str] = setting(
        help="leave out files that match (repeatable)", factory=list, metavar="GLOB", cli={"action": "append"}
    )
    invalid_utf8: str = setting(
        "strict",
        "read invalid UTF-8 bytes as U+FFFD instead of failing",
        cli={"flag": "--replace-invalid-utf8", "action": "store_const", "const": "replace"},
    )
    text_field: str = setting(
        "text",
        "in files of records (.jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet): the field or column each document's "
        "text is in",
        metavar="FIELD",
    )
    # None: 0.1 (held_out); left unset so that --val-data can refuse a share given alongside it
    val_fraction: float | None = setting(
        None, "hold out the last F of the text, by characters, for validation (default 0.1)", metavar="F"
    )
    val_data: list[str] | None = setting(
        None,
        "validate on these files, folders or globs instead of a held-out share (FineWeb's val shard); every file "
        "of --data is then trained on",
        metavar="PATH",
    )
    # a new model gets gpt2 with 128 merges (NEW_MODEL_DEFAULTS)
    tokenizer: str = setting(
        "char",
        "char: one id per character of the corpus; gpt2: GPT-2's byte-level BPE; FOLDER: a byte-level BPE "
        "`gptlab tokenizer train` made",
        metavar="{char,gpt2,FOLDER}",
    )
    merges: int | None = setting(
        None, "GPT-2's BPE with only its first N merges (vocabulary 257 + N); --tokenizer gpt2 alone keeps all 50,000"
    )
    cache_dir: str | None = setting(
        None,
        "token cache folder; may be on storage every machine shares (default: under ~/.cache/gptlab/tokens)",
        resumable=True,
    )
    prepared: str | None = setting(
        None,
        "train from the token cache `gptlab prepare` wrote there, reading no source (it fixes the data, the "
        "tokenizer and the split)",
        metavar="CACHE",
    )

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
    model: str = setting("gpt2-micro", "preset shape", choices=tuple(PRESETS))
    init: str | None = setting(
        None,
        "fine-tune: start from this gptlab or Hugging Face GPT-2 folder's weights, shape and tokenizer; changes "
        f"the defaults to {FINETUNE_DEFAULTS}",
        metavar="CHECKPOINT",
    )
    # The shape: None is the preset's or the checkpoint's; a value overrides them.
    vocab_size: int | None = setting(
        None, "pad the vocabulary to this size (nanoGPT pads 50257 to 50304 for speed); default: the tokenizer's"
    )
    context_length: int | None = setting(
        None, "tokens per window (nanoGPT's block_size, GPT-2's n_positions); with --init at most the checkpoint's"
    )
    emb_dim: int | None = setting(None, "width (nanoGPT's and GPT-2's n_embd)")
    n_heads: int | None = setting(None, "attention heads (n_head)")
    n_layers: int | None = setting(None, "blocks (n_layer)")
    drop_rate: float | None = setting(
        None, "dropout on the embeddings and shortcuts (GPT-2's resid_pdrop and embd_pdrop)"
    )
    attn_drop_rate: float | None = setting(
        None,
        "dropout on the attention weights (attn_pdrop); default --drop-rate. On CPU any attention dropout halves "
        "the speed",
    )
    qkv_bias: bool | None = setting(None, "biases on q, k, v (GPT-2 has them)")
    tie_embeddings: bool | None = setting(None, "share the head with the token embedding (GPT-2 does)")
    # LoRA (with --init): adapters of this rank train while the model's weights stay frozen. None: every
    # weight trains. The other LoRA settings need it (gptlab.finetune.hooks.lora_config checks them, and
    # the fine-tuning layer supplies their choices).
    lora_rank: int | None = setting(
        None,
        "train LoRA adapters of this rank (16 is the textbook's) on the frozen --init model instead of every weight",
    )
    lora_alpha: float | None = setting(
        None, "scale the adapters' update by alpha / rank (default: the rank, a scale of 1)"
    )
    lora_dropout: float | None = setting(None, "dropout on the adapters' input (default: 0)")
    lora_targets: list[str] | None = setting(
        None,
        "the projections that get adapters: qkv and out_proj (attention), fc and proj (feed-forward), head "
        "(default: all but head)",
    )
    lora_base_dtype: str | None = setting(
        None, "keep the frozen base in float32, bfloat16 or int8; the adapters train in float32 (default: float32)"
    )


# The LoRA settings, lora_rank first: the fine-tuning layer's to act on (finetune/hooks.py).
LORA_SETTINGS = tuple(item.name for item in dataclasses.fields(ModelConfig) if item.name.startswith("lora_"))


@dataclass
class TrainConfig:
    """How the loop optimises, when it stops, and what it reports. The defaults, with NEW_MODEL_DEFAULTS,
    are the recipe for the embedded corpus (README, time to quality)."""

    out: str = setting("runs/default", "run folder: checkpoints last/ and best/, run.toml, metrics.jsonl, loss.png")
    batch_size: int = setting(
        16,
        "sequences per optimizer step over ALL processes (the global batch; nanoGPT's batch_size x "
        "gradient_accumulation_steps x processes)",
    )
    micro_batch_size: int | None = setting(
        None,
        "sequences per forward pass per process; gradients accumulate up to --batch-size (default: batch / processes)",
        resumable=True,
    )
    # Every token starts a window: on a small corpus each epoch then sees the text at new offsets, which
    # generalises far better than fixed non-overlapping windows. None: context_length (no overlap).
    stride: int | None = setting(
        1,
        "tokens between window starts; 1 puts a window at every token, like nanoGPT's random offsets (default "
        "with --init: the context length)",
    )
    optimizer: str = setting(
        "muon",
        "adamw, or muon: Muon on the blocks' matrices and AdamW on embeddings, head, biases and norms, at one "
        "learning rate",
        choices=OPTIMIZERS,
    )
    lr: float = setting(8e-3, "peak learning rate (nanoGPT's learning_rate)")
    min_lr_ratio: float = setting(0.1, "the cosine ends at lr x this (nanoGPT's min_lr / learning_rate)")
    warmup_steps: int = setting(50, "linear warmup steps (nanoGPT's warmup_iters)")
    schedule: str = setting(
        "cosine",
        "after the warmup: cosine to the floor, or wsd (warmup-stable-decay): constant, then a line to the floor "
        "over the cooldown",
        choices=SCHEDULES,
    )
    cooldown_fraction: float = setting(0.2, "with --schedule wsd: the share of the run spent decaying")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only")
    # On a small corpus a short run underfits, and dropout only slows it, while a long one overfits without
    # it (README, time to quality; training/dropout.py).
    dropout_from_epoch: float = setting(
        4.0,
        "keep the model's dropout off until the run has seen this many epochs of the training data; 0: from the "
        "first step (0 with --init)",
    )
    # Judged once, when dropout switches on, from the run's progress toward its limit (for a time budget,
    # the speed so far). None: never (a new model from scratch gets 18, NEW_MODEL_DEFAULTS).
    dropout_double_for_epochs: float | None = setting(
        None,
        "a run that will see at least this many epochs (judged when its dropout switches on) runs every dropout "
        "at twice the model's rate (never with --init)",
    )
    # "sinusoidal" (the original Transformer's code, scaled to GPT-2's init RMS) skips the plateau where a
    # character model otherwise spends a seventh of its 5 minutes; "gpt2" is GPT-2's random init. A loaded
    # model keeps its table.
    pos_init: str = setting("sinusoidal", "a new model's position table", choices=POSITION_INITS)
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 turns clipping off")
    # averaging.py; a new model from scratch gets 0.99 (NEW_MODEL_DEFAULTS)
    ema_decay: float = setting(
        0.0,
        "evaluate and save a moving average of the weights with this decay per step; 0 turns it off (a new "
        "model: 0.99; 0 with --init)",
    )
    max_steps: int | None = setting(None, "stop after this many optimizer steps (nanoGPT's max_iters)", resumable=True)
    max_tokens: int | None = setting(None, "stop after this many training tokens", resumable=True)
    epochs: float | None = setting(
        None,
        "stop after this many epochs; an epoch is as many tokens as the training split holds. Default on your "
        "own text: 1",
        resumable=True,
    )
    time_budget: float | None = setting(
        None,
        "stop after this many seconds of training. Default on the embedded corpus: 300",
        metavar="SECONDS",
        resumable=True,
    )
    eval_interval: int = setting(250, "evaluate and save last/ (and best/) every N steps", resumable=True)
    eval_tokens: int | None = setting(
        None,
        "score a seeded subset of about N validation tokens at each evaluation (the same subset each time) and "
        "the whole split at the end (default: the whole split each time)",
        metavar="N",
    )
    loggers: list[str] = setting(
        help="also log what metrics.jsonl records to TensorBoard (runs/NAME/tensorboard/), Weights & Biases "
        "(runs/NAME/wandb/; offline without an API key), MLflow ($MLFLOW_TRACKING_URI, else runs/NAME/mlruns) "
        "and/or metrics.csv",
        factory=list,
        choices=LOGGERS,
        cli={"flag": "--logger"},
        resumable=True,
    )
    log_interval: int = setting(20, "print a log line and record metrics every N steps", resumable=True)
    sample_tokens: int = setting(200, "characters of sample text at each evaluation (0: none)", resumable=True)
    dtype: str = setting(
        "auto",
        "autocast dtype (default auto: bfloat16 where the device has bfloat16 arithmetic, else float32)",
        choices=DTYPES,
    )
    compile: bool = setting(False, "torch.compile the model and loss", resumable=True)
    fsdp: bool = setting(False, "shard the model with FSDP2 (under torchrun)")
    activation_checkpointing: bool = setting(
        False, "recompute each block's activations in the backward pass to save memory"
    )
    seed: int = setting(1337, "seeds the weights, the window order and dropout")
    device: str = setting("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps", resumable=True)
    progress: bool = setting(
        True, "no progress bars", cli={"flag": "--no-progress", "action": "store_false"}, resumable=True
    )

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
        if self.pos_init not in POSITION_INITS:
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
# twice the dropout, and an average of the weights scores better than the weights. They are a new model's
# and not a fine-tune's (FINETUNE_DEFAULTS), and `--tokenizer gpt2` alone means GPT-2's whole BPE, so they
# are a layer over the dataclasses' defaults rather than those defaults. A run file of schema 2 is read
# through neither layer; one written before the schema (1) through both, as it was written.
NEW_MODEL_DEFAULTS = {"tokenizer": "gpt2", "merges": 128, "dropout_double_for_epochs": 18.0, "ema_decay": 0.99}


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Setting:
    """One row of the settings table: what the command line, TOML and --resume know of a setting."""

    name: str  # the TOML key; the option is --name-with-dashes unless cli says another flag
    section: str  # data, model or train: its table in run.toml
    kind: type  # int, float, str, bool or list (of str)
    optional: bool  # None allowed (unset)
    default: object
    help: str
    choices: tuple[str, ...] | None
    metavar: str | None
    cli: dict
    resumable: bool  # --resume may change it: when and how often the run stops and reports, and where it runs

    def accepts(self, value) -> bool:
        """Whether a TOML or Python value has this setting's type (an int is accepted for a float)."""
        if value is None:
            return self.optional
        if self.kind is list:
            return isinstance(value, list) and all(isinstance(item, str) for item in value)
        if self.kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return isinstance(value, self.kind) and (self.kind is bool or not isinstance(value, bool))


def settings_table() -> list[Setting]:
    rows = []
    for section, kind in SECTIONS.items():
        hints = typing.get_type_hints(kind)
        for item in dataclasses.fields(kind):
            hint = hints[item.name]
            union = isinstance(hint, types.UnionType)  # X | None
            (base,) = [t for t in typing.get_args(hint) if t is not type(None)] if union else [hint]
            default = [] if item.default is dataclasses.MISSING else item.default
            meta = item.metadata
            rows.append(
                Setting(
                    item.name,
                    section,
                    typing.get_origin(base) or base,
                    union,
                    default,
                    meta["help"],
                    meta["choices"],
                    meta["metavar"],
                    meta["cli"],
                    meta["resumable"],
                )
            )
    return rows


# Every setting of a run, in the dataclasses' order; the command line's options are made from it.
SETTINGS = settings_table()
SETTING = {row.name: row for row in SETTINGS}
# What `--resume` lets the command line change: when and how often the run stops, reports and where it
# runs. Everything else would make the resumed run a different run.
RESUMABLE = frozenset(row.name for row in SETTINGS if row.resumable)


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
        lines = ["# gptlab run settings: `gptlab train --config THIS_FILE` repeats the run.", f"schema = {SCHEMA}", ""]
        for section in SECTIONS:
            lines.append(f"[{section}]")
            for name, value in dataclasses.asdict(getattr(self, section)).items():
                if value is not None:  # TOML has no null: an absent key means "not set"
                    lines.append(f"{name} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def option_names() -> list[str]:
    return [row.name for row in SETTINGS]


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
    """A recipe's settings, flattened: top-level keys and the keys of [data], [model] and [train]; for a run
    file of the current schema, every setting (those it leaves out are None)."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file; give the path of a .toml recipe (see recipes/)") from None
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path} is not valid TOML: {error}") from None
    schema = document.pop("schema", None)
    if schema is not None and (isinstance(schema, bool) or schema not in range(1, SCHEMA + 1)):
        raise ConfigError(
            f"--config {path}: schema = {schema!r}, but this gptlab reads run files of schema 1 to {SCHEMA}; "
            "a newer gptlab wrote it, so upgrade, or remove the line to read it as a recipe"
        )
    values = {}
    for key, value in document.items():
        if key in SECTIONS and isinstance(value, dict):
            values.update(value)
        else:
            values[key] = value
    check_keys(values, f"--config {path}")
    check_types(values, f"--config {path}")
    if schema == SCHEMA:  # a whole run: what it leaves out is unset, not the default
        values = {**{row.name: None for row in SETTINGS if row.optional}, **values}
    return values


def check_types(values: dict, where: str) -> None:
    """Each value must have its setting's type (SETTINGS; an int is accepted where a float is wanted)."""
    for name, value in values.items():
        row = SETTING[name]
        if not row.accepts(value):
            wanted = "list of strings" if row.kind is list else row.kind.__name__
            raise ConfigError(f"{name} = {value!r} in {where} should be {wanted}")


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
