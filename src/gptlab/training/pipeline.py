"""The whole job behind `gptlab train` and `gptlab eval`, as functions the Python API exposes:

    gptlab.train(data=["notes/"], out="runs/notes", max_steps=2000)      # any option of `gptlab train`
    gptlab.train(config="recipes/embedded.toml", out="runs/x")           # a recipe, with overrides
    gptlab.train(out="runs/x", resume=True)                              # continue a run exactly
    gptlab.evaluate("runs/x/best")                                       # the run's own held-out split

One pipeline runs every kind of run (run_job): it resolves the settings (training/config.py; a resumed run's
own), starts the runtime, asks the kind of run for the loop's parts (RunKind: the data, the model and
tokenizer, the hooks), runs the loop (training/trainer.py) and writes the report card. train() is it with
Pretraining, which reads the corpus (or a prepared cache), chooses the tokenizer and the model (new, from
--init, or the run's own when resuming) and builds or reuses the token cache once per machine; a fine-tuning
task is another kind (finetune/pipeline.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .. import data
from ..checkpoint import read_config
from ..config import GPTConfig, get_config
from ..loading import load_model
from ..report import parameter_report
from ..tokenizer import Tokenizer, read_tokenizer_folder, tokenizer_from_spec, tokenizer_name
from .config import (
    LIMITS,
    LORA_SETTINGS,
    ConfigError,
    DataConfig,
    RunConfig,
    TrainConfig,
    check_keys,
    check_types,
    read_toml,
    resolve,
    resume_settings,
    with_default_limit,
)
from .data_record import check_data, sources_of
from .evaluation import EvalResult
from .evaluation import evaluate as evaluate_tokens
from .report_card import write_report_card
from .runtime import Runtime, TrainingError, pick_device, start_runtime, stop_runtime, with_training_dtype
from .sources import TrainingData, TrainingSource
from .state import check_out_dir, read_run_config
from .trainer import ModelHooks, TrainResult
from .trainer import train as train_loop

# What a model loaded with --init keeps: its shape and tokenizer. Dropout, a shorter context and a padded
# vocabulary can change (the last two by cropping the position table and padding the token table).
SKIPPED_SHOWN = 10  # skipped files listed by name; the rest are counted

FIXED_BY_INIT = (
    "model",
    "tokenizer",
    "merges",
    "emb_dim",
    "n_heads",
    "n_layers",
    "qkv_bias",
    "tie_embeddings",
    "pos_init",
)


def gather_settings(
    config: str | os.PathLike | RunConfig | None, options: dict, resume: bool, overwrite: bool
) -> tuple[dict, Path]:
    """The settings given (a recipe's, then the options'), checked, and the run folder they name, checked
    before anything is read (nothing is created yet)."""
    given = dict(options)
    check_keys(given, "the options")
    check_types({k: v for k, v in given.items() if v is not None}, "the options")
    if isinstance(config, RunConfig):
        given = {**config.flat(), **given}
    elif config is not None:
        given = {**read_toml(config), **given}
    out = Path(given.get("out") or RunConfig().train.out)
    check_out_dir(out, resume, overwrite)
    return given, out


# What a layer above training supplies to change a run's model: given the run's settings, its model's shape
# and the log, the loop's ModelHooks. Fine-tuning's (finetune/hooks.py run_hooks) adds LoRA adapters;
# gptlab.train passes it, so training never imports finetune.
HooksFor = Callable[[RunConfig, GPTConfig, Callable[[str], None]], ModelHooks]


def pretraining_hooks(run: RunConfig, cfg: GPTConfig, log: Callable[[str], None]) -> ModelHooks:
    """The loop's own hooks; a run with adapter settings needs the fine-tuning layer's instead."""
    given = [name for name in LORA_SETTINGS if getattr(run.model, name) is not None]
    if given:
        raise ConfigError(
            f"--{given[0].replace('_', '-')} needs fine-tuning's adapters, which training.pipeline.train "
            "alone does not add; call gptlab.train (or `gptlab train`) instead"
        )
    return ModelHooks()


@dataclass(frozen=True)
class RunParts:
    """What a kind of run gives the loop once its settings are resolved."""

    run: RunConfig  # the run's settings as recorded, with what the parts fixed (a prepared cache: its tokenizer)
    model_cfg: GPTConfig
    tokenizer: Tokenizer
    init_state: dict[str, torch.Tensor] | None
    source: TrainingData | TrainingSource
    hooks: ModelHooks
    described: str  # what the run trained on, in words, for its report card
    loop: TrainConfig | None = None  # the loop's settings, where they are not the run's own


class RunKind(Protocol):
    """What a kind of run brings to the one pipeline (run_job): pretraining on a token stream (Pretraining,
    below), or a fine-tuning task (finetune/pipeline.py)."""

    def settings(self, given: dict, meta: dict | None, out: Path) -> dict:
        """For a new run (meta None), the settings to resolve from those given; on --resume, a check of the
        last checkpoint's config.json extras (meta). Refuses what this kind cannot run."""

    def parts(
        self, run: RunConfig, note: str, given: dict, resume: bool, accept_data_change: bool, runtime: Runtime, log
    ) -> RunParts:
        """The loop's model, tokenizer, data and hooks, said in the log (`note`: which limits apply and why)."""

    def finish(self, result: TrainResult, parts: RunParts, runtime: Runtime) -> None:
        """What the run does once the loop has ended, before its report card is written."""


def run_job(
    kind: RunKind,
    config: str | os.PathLike | RunConfig | None,
    options: dict,
    *,
    resume: bool,
    overwrite: bool,
    accept_data_change: bool,
    log,
) -> TrainResult:
    """Every run, pretraining or fine-tuning: the settings (a new run's resolved, a resumed run's own with the
    changes a resume may make), the runtime, the kind's parts, the loop, and the report card."""
    given, out = gather_settings(config, options, resume, overwrite)
    if accept_data_change and not resume:
        raise TrainingError("--accept-data-change lets a resumed run go on with changed data; add --resume, or drop it")
    if resume:
        saved = read_run_config(out / "last")
        model_cfg, _, meta = read_config(out / "last")
        kind.settings(given, meta, out)
        if saved is None:
            raise TrainingError(
                f"--resume: {out / 'last'} has no run.toml (it was written by an older gptlab); start a new run"
            )
        run, note = resume_settings(saved, given, model_cfg.to_dict()), "the run's own"
        changed = [f"--{name.replace('_', '-')} {given[name]:g}" for name in LIMITS if given.get(name) is not None]
        if changed:
            note += f" with {', '.join(changed)} from here; it stops at whichever comes first"
        given = {}
    else:
        run, note = with_default_limit(resolve(kind.settings(given, None, out)))
    runtime = start_runtime(run.train.device)
    try:
        say = log if runtime.is_main else (lambda line: None)
        run = dataclasses.replace(run, train=with_training_dtype(run.train, runtime.device, say))
        parts = kind.parts(run, note, given, resume, accept_data_change, runtime, log)
        run = parts.run
        result = train_loop(
            parts.model_cfg,
            parts.loop or run.train,
            parts.tokenizer,
            parts.source,
            runtime=runtime,
            resume=resume,
            overwrite=overwrite,
            init_state=parts.init_state,
            run=run,
            hooks=parts.hooks,
            log=log,
        )
        kind.finish(result, parts, runtime)
        if runtime.is_main:
            log(f"report: {write_report_card(result, parts.described, parts.tokenizer, parts.model_cfg)}")
        return result
    finally:
        stop_runtime(runtime)


def resumed_model(run: RunConfig) -> tuple[GPTConfig, Tokenizer, dict[str, torch.Tensor] | None]:
    """A resumed run's shape and tokenizer, from its last checkpoint; for a LoRA run, which holds the
    adapters, the frozen base from --init again."""
    model_cfg, tokenizer, _ = read_config(Path(run.train.out) / "last")
    return model_cfg, tokenizer, initial_model(run, {})[2] if run.model.lora_rank is not None else None


def train(
    config: str | os.PathLike | RunConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    accept_data_change: bool = False,
    log=print,
    hooks_for: HooksFor = pretraining_hooks,
    **options,
) -> TrainResult:
    """Train as `gptlab train` does. `config`: a TOML recipe's path or a RunConfig; `options`: any setting by
    its option name (`out`, `data`, `max_steps`, ...), overriding the recipe. A resume refuses data that
    changed since the run started unless `accept_data_change` (data_record.py). `hooks_for` changes the
    model (see HooksFor); gptlab.train is this function with fine-tuning's."""
    return run_job(
        Pretraining(hooks_for),
        config,
        options,
        resume=resume,
        overwrite=overwrite,
        accept_data_change=accept_data_change,
        log=log,
    )


@dataclass(frozen=True)
class Pretraining:
    """A run on a token stream (RunKind): a corpus or a prepared token cache, and a new model or --init's."""

    hooks_for: HooksFor = pretraining_hooks

    def settings(self, given: dict, meta: dict | None, out: Path) -> dict:
        return given

    def finish(self, result: TrainResult, parts: RunParts, runtime: Runtime) -> None:
        pass

    def parts(
        self, run: RunConfig, note: str, given: dict, resume: bool, accept_data_change: bool, runtime: Runtime, log
    ) -> RunParts:
        out = Path(run.train.out)
        if run.data.prepared:  # no source is read: every process maps the prepared cache, none waits for another
            corpus, prepared = None, open_prepared(run.data.prepared, given)
            inputs = prepared.manifest["inputs"]  # what run.toml records is what the cache holds
            run = dataclasses.replace(
                run,
                data=dataclasses.replace(
                    run.data,
                    tokenizer=inputs["tokenizer"]["type"],  # a trained BPE's is "bpe": the cache holds its merges
                    merges=inputs["tokenizer"].get("merges") if inputs["tokenizer"]["type"] == "gpt2" else None,
                    val_fraction=round(1 - inputs["train_fraction"], 12),
                ),
            )
            read = f"{describe_prepared(prepared)}; no source is read"
            if runtime.is_main:
                log(f"data: {read}")
        else:
            corpus, prepared = read_corpus(run.data), None
            read = EMBEDDED_NAME if run.data.data is None else corpus.summary()
            if run.data.val_data:
                read += f"; validated on {' '.join(run.data.val_data)}"
            if runtime.is_main:
                log(f"data: {read}")
                for path, reason in corpus.skipped[:SKIPPED_SHOWN]:
                    log(f"  skipped {path}: {reason}")
                if len(corpus.skipped) > SKIPPED_SHOWN:
                    log(
                        f"  ... and {len(corpus.skipped) - SKIPPED_SHOWN} more skipped (choose files with "
                        "--include/--exclude)"
                    )
        init_state = None
        if resume:  # the model and tokenizer are the run's, from its last checkpoint
            model_cfg, tokenizer, init_state = resumed_model(run)
        elif run.model.init:
            model_cfg, tokenizer, init_state = initial_model(run, given)
        else:
            tokenizer = (
                tokenizer_from_spec(prepared.manifest["inputs"]["tokenizer"])
                if prepared
                else new_tokenizer(run.data, corpus, runtime)
            )
            model_cfg = new_model_config(run, tokenizer)
        hooks = self.hooks_for(run, model_cfg, log if runtime.is_main else lambda line: None)
        if prepared:
            check_prepared_tokenizer(prepared, tokenizer)
            cache = prepared
        else:
            cache = run_caches(run.data, corpus, tokenizer, runtime, run.train.progress, log)
        if runtime.is_main:
            log(
                f"tokens: {len(cache.train_tokens):,} training and {len(cache.val_tokens):,} validation "
                f"({type(tokenizer).__name__}, vocabulary {tokenizer.vocab_size:,}); token cache {cache.directory}"
                f"{resumed_note(cache)}"
            )
            log("\n".join(parameter_report(model_cfg).format(run.model.init or run.model.model).splitlines()[:2]))
            log(f"settings: {out / 'run.toml'} (limits: {note})")
        if resume:
            changed = check_data(out, cache.manifest, accept_data_change, "resume", write=runtime.is_main)
            if changed and runtime.is_main:
                log(changed)
        token_bytes = data.token_byte_lengths(tokenizer) if run.train.eval_tokens is not None else None
        corpus_data = TrainingData(
            cache.train_tokens, cache.val_tokens, cache.val_target_bytes, sources_of(cache.manifest), token_bytes
        )
        return RunParts(run, model_cfg, tokenizer, init_state, corpus_data, hooks, read)


# What a prepared cache fixes, so a run from one may not set it again.
PREPARED_FIXES = (
    "data",
    "include",
    "exclude",
    "invalid_utf8",
    "text_field",
    "tokenizer",
    "merges",
    "val_fraction",
    "val_data",
    "cache_dir",
)


def open_prepared(path: str, given: dict) -> data.TokenCache:
    """The token cache `gptlab prepare` wrote at path. A setting it already fixes is refused by name, unless
    it says what the cache holds (a recipe's tokenizer = "gpt2" over a cache prepared with GPT-2's BPE)."""
    try:
        cache = data.open_token_cache(path)
    except data.DataError:
        raise ConfigError(
            f"--prepared {path} holds no token cache; make one with gptlab prepare --data ... --out {path}"
        ) from None
    inputs = cache.manifest["inputs"]
    agrees = {
        "val_fraction": lambda value: abs(value - (1 - inputs["train_fraction"])) < 1e-9,
        "tokenizer": lambda value: same_tokenizer(value, given.get("merges"), inputs["tokenizer"]),
        "merges": lambda value: same_tokenizer(given.get("tokenizer", "gpt2"), value, inputs["tokenizer"]),
    }
    fixed = [
        name
        for name in PREPARED_FIXES
        if given.get(name) is not None and not (name in agrees and agrees[name](given[name]))
    ]
    if fixed:
        raise ConfigError(
            f"--{fixed[0].replace('_', '-')}: the prepared cache {path} already fixes its data, "
            "tokenizer and split; drop it, or prepare the data again with it"
        )
    return cache


def same_tokenizer(setting: str, merges: int | None, spec: dict) -> bool:
    """Whether --tokenizer setting (with --merges) names the tokenizer of this spec."""
    if setting == "gpt2":
        return spec["type"] == "gpt2" and merges == spec.get("merges")
    if setting == "char":
        return spec["type"] == "char" and merges is None
    return (
        merges is None
        and spec["type"] == "bpe"
        and Path(setting).is_dir()
        and read_tokenizer_folder(setting).spec() == spec
    )


def describe_prepared(cache: data.TokenCache) -> str:
    sources = cache.manifest["inputs"]["sources"]
    size = sum(source["bytes"] for source in sources)
    return (
        f"the token cache {cache.directory}, prepared from {len(sources):,} file{'s' if len(sources) != 1 else ''} "
        f"({size:,} bytes)"
    )


def check_prepared_tokenizer(cache: data.TokenCache, tokenizer: Tokenizer) -> None:
    spec = cache.manifest["inputs"]["tokenizer"]
    if spec != tokenizer.spec():
        raise ConfigError(
            f"the prepared cache {cache.directory} was tokenized with {tokenizer_name(spec)}, but the "
            f"model's tokenizer is {tokenizer_name(tokenizer.spec())}; prepare the data with the model's "
            "tokenizer (gptlab prepare --tokenizer ...)"
        )


def prepare(
    data_paths: list[str], out: str | os.PathLike, *, progress: bool = True, log=print, **options
) -> data.TokenCache:
    """Tokenize a corpus once into a token cache at `out`, as `gptlab prepare` does, for `gptlab train
    --prepared out` to train from without reading the sources. `options`: the data settings by option
    name (tokenizer, merges, text_field, val_fraction, include, exclude, invalid_utf8), defaulting as
    for a new model."""
    unknown = sorted(set(options) - set(PREPARED_FIXES))
    if unknown:
        raise ConfigError(f"prepare takes data settings only, not {unknown[0]!r}")
    settings = resolve({**options, "data": list(data_paths)}).data
    corpus = read_corpus(settings)
    log(f"data: {corpus.summary()}")
    tokenizer = data.build_tokenizer(settings.tokenizer, corpus, settings.merges)
    start = time.perf_counter()
    cache = data.build_token_cache(corpus, tokenizer, out, progress=progress, train_fraction=1 - settings.held_out)
    seconds = time.perf_counter() - start
    tokens = len(cache.train_tokens) + len(cache.val_tokens)
    speed = (
        "reused: the sources are unchanged"
        if not cache.built
        else f"{seconds:.1f} s, {corpus.n_bytes / seconds / 1e6:.1f} MB/s, {tokens / seconds:,.0f} tokens/s"
        + resumed_note(cache)
    )
    log(
        f"tokens: {len(cache.train_tokens):,} training and {len(cache.val_tokens):,} validation "
        f"({tokenizer_name(tokenizer.spec())}) in {cache.directory} ({speed}); train with: gptlab train --prepared "
        f"{out}"
    )
    return cache


def resumed_note(cache: data.TokenCache) -> str:
    if not cache.resumed_chars:
        return ""
    share = cache.resumed_chars / cache.manifest["total_chars"]
    return f"; went on with an interrupted build, whose first {cache.resumed_chars:,} characters ({share:.0%}) it kept"


def read_corpus(settings: DataConfig) -> data.Corpus:
    if settings.data is None:
        return data.default_corpus()
    return data.read_corpus(
        settings.data,
        settings.invalid_utf8,
        include=settings.include,
        exclude=settings.exclude,
        text_field=settings.text_field,
    )


EMBEDDED_NAME = "the embedded corpus (pydoc_data.topics, Python's bundled documentation)"


def describe_sources(settings: DataConfig) -> str:
    return EMBEDDED_NAME if settings.data is None else " ".join(settings.data)


def new_tokenizer(settings: DataConfig, corpus: data.Corpus, runtime: Runtime) -> Tokenizer:
    """A character vocabulary is every character of the corpus: one process reads it, the others get its spec."""
    if settings.tokenizer != "char" or not runtime.distributed:
        return data.build_tokenizer(settings.tokenizer, corpus, settings.merges)
    spec = [data.build_tokenizer("char", corpus).spec() if runtime.is_main else None]
    torch.distributed.broadcast_object_list(spec, src=0)
    return tokenizer_from_spec(spec[0])


def new_model_config(run: RunConfig, tokenizer: Tokenizer) -> GPTConfig:
    shape = {
        name: getattr(run.model, name)
        for name in (
            "context_length",
            "emb_dim",
            "n_heads",
            "n_layers",
            "drop_rate",
            "attn_drop_rate",
            "qkv_bias",
            "tie_embeddings",
        )
    }
    vocab_size = run.model.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"--vocab-size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
            "leave it out, or pad it to a larger size (nanoGPT pads 50257 to 50304)"
        )
    return get_config(run.model.model, vocab_size=vocab_size, **shape)


def initial_model(run: RunConfig, given: dict) -> tuple[GPTConfig, Tokenizer, dict[str, torch.Tensor]]:
    """The model to fine-tune from --init, with the changes a loaded model allows; `given`: the settings
    the user chose, which must not include one that a loaded model fixes."""
    fixed = [name for name in FIXED_BY_INIT if name in given]
    if fixed:
        raise ConfigError(
            f"--init takes the model's shape and tokenizer from {run.model.init}; drop "
            f"--{fixed[0].replace('_', '-')} (a fine-tune may change --drop-rate, --attn-drop-rate, "
            "--context-length and --vocab-size)"
        )
    model, tokenizer = load_model(run.model.init)
    state = model.state_dict()
    cfg = model.cfg
    context = run.model.context_length or cfg.context_length
    if context > cfg.context_length:
        raise ConfigError(
            f"--context-length {context} is longer than {run.model.init}'s {cfg.context_length}: its "
            f"position table has no rows past that; choose at most {cfg.context_length}"
        )
    vocab_size = run.model.vocab_size or cfg.vocab_size
    if vocab_size < cfg.vocab_size:
        raise ConfigError(
            f"--vocab-size {vocab_size} is smaller than {run.model.init}'s {cfg.vocab_size}; "
            "a fine-tune can only pad the vocabulary"
        )
    changes = {"context_length": context, "vocab_size": vocab_size}
    for name in ("drop_rate", "attn_drop_rate"):
        if getattr(run.model, name) is not None:
            changes[name] = getattr(run.model, name)
    state["pos_emb.weight"] = state["pos_emb.weight"][:context]  # the first positions keep their meaning
    for name in ("tok_emb.weight", "out_head.weight"):
        if name in state and vocab_size > cfg.vocab_size:  # padded rows stand for ids the tokenizer never emits
            rows = state[name]
            state[name] = torch.cat([rows, rows.new_zeros(vocab_size - cfg.vocab_size, rows.shape[1])])
    return cfg.replace(**changes), tokenizer, state


def run_caches(settings: DataConfig, corpus: data.Corpus, tokenizer: Tokenizer, runtime: Runtime, progress: bool, log):
    """A run's token cache: the corpus split by --val-fraction, or with --val-data every token of the corpus
    on the training side and the validation files' on the other (two caches, seen as one: the validation
    files' tokens and bytes, and every source of both in its manifest, so a resume checks them all)."""
    if not settings.val_data:
        return token_cache(corpus, tokenizer, settings.cache_dir, runtime, progress, 1 - settings.held_out)
    val_settings = dataclasses.replace(settings, data=list(settings.val_data), val_data=None)
    val_corpus = read_corpus(val_settings)
    if runtime.is_main:
        log(f"validation data: {val_corpus.summary()}")
    train = token_cache(corpus, tokenizer, settings.cache_dir, runtime, progress, train_fraction=1.0)
    val_dir = str(Path(settings.cache_dir) / "val") if settings.cache_dir else None
    val = token_cache(val_corpus, tokenizer, val_dir, runtime, progress, train_fraction=0.0)
    inputs = {
        **train.manifest["inputs"],
        "sources": train.manifest["inputs"]["sources"] + val.manifest["inputs"]["sources"],
    }
    manifest = {
        **train.manifest,
        "inputs": inputs,
        "splits": {"train": train.manifest["splits"]["train"], "val": val.manifest["splits"]["val"]},
    }
    return dataclasses.replace(train, manifest=manifest, val_tokens=val.val_tokens)


def token_cache(
    corpus: data.Corpus,
    tokenizer: Tokenizer,
    cache_dir: str | None,
    runtime: Runtime,
    progress: bool,
    train_fraction: float = data.TRAIN_FRACTION,
) -> data.TokenCache:
    """Build the cache, or check and reuse it, in every process, one at a time under the cache's lock
    (data/cache.py build_lock): the first builds it (on each machine's own disk, or once on storage all
    machines share with --cache-dir) and the others, waiting on the lock rather than in a collective with a
    timeout, find it whole and only check the files' sizes and times."""
    directory = Path(cache_dir) if cache_dir else data.default_cache_dir(corpus, tokenizer, train_fraction)
    # progress in every process: the one that builds shows its bars, the others have nothing to show
    return data.build_token_cache(corpus, tokenizer, directory, progress=progress, train_fraction=train_fraction)


@dataclass(frozen=True)
class Evaluation:
    result: EvalResult
    scored: str  # what text was scored, in words


def evaluate(
    checkpoint: str | os.PathLike,
    data_paths: list[str] | None = None,
    *,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    quantize: str | None = None,
    include: list[str] = (),
    exclude: list[str] = (),
    invalid_utf8: str = "strict",
    cache_dir: str | None = None,
    progress: bool = False,
    accept_data_change: bool = False,
    text_field: str = "text",
) -> Evaluation:
    """Loss, perplexity and bits per byte of a checkpoint, as `gptlab eval` reports them: on the whole of
    `data_paths`, or without them on the held-out split of the data its run trained on (the embedded
    corpus' for a checkpoint that no gptlab run wrote), refusing data changed since the run unless
    `accept_data_change`."""
    runtime = Runtime(pick_device(device))
    model, tokenizer = load_model(checkpoint, device=runtime.device, dtype=getattr(torch, dtype))
    if quantize:
        from ..inference.quantize import quantize_model

        model = quantize_model(model, quantize)
    if data_paths:
        settings = DataConfig(
            data=list(data_paths),
            include=list(include),
            exclude=list(exclude),
            invalid_utf8=invalid_utf8,
            cache_dir=cache_dir,
            text_field=text_field,
        )
        corpus = read_corpus(settings)
        cache = token_cache(corpus, tokenizer, cache_dir, runtime, progress, train_fraction=0.0)
        scored = f"the whole of {describe_sources(settings)}"
    else:
        run = read_run_config(checkpoint)
        settings = run.data if run else DataConfig()
        if settings.prepared:
            cache = open_prepared(settings.prepared, {})
            check_prepared_tokenizer(cache, tokenizer)
            scored = f"the held-out {settings.held_out:.0%} of {describe_prepared(cache)}"
        else:
            cache = run_caches(settings, read_corpus(settings), tokenizer, runtime, progress, log=lambda line: None)
            scored = (
                f"the whole of the run's validation data, {' '.join(settings.val_data)}"
                if settings.val_data
                else f"the held-out {settings.held_out:.0%} of {describe_sources(settings)}"
            )
        if run is None:
            scored += " (no run.toml: this checkpoint was not written by a gptlab run)"
        else:  # a run's checkpoint: runs/NAME/best or last, with the run's data record beside it
            note = check_data(Path(checkpoint).parent, cache.manifest, accept_data_change, "eval", write=False)
            scored += f" ({note})" if note else ""
    # The weights are already in `dtype`: no autocast on top (evaluation's "float32" means none).
    result = evaluate_tokens(model, cache.val_tokens, cache.val_target_bytes, batch_size, runtime, dtype="float32")
    return Evaluation(result, scored)
