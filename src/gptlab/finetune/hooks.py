"""How fine-tuning changes what the training loop trains and saves (trainer.ModelHooks): LoRA adapters on
a frozen base, optionally kept in bfloat16 or int8, and checkpoints that stay loadable.

A LoRA run's checkpoint (last/, best/) holds
    config.json + model.safetensors          the merged model (base + alpha / rank · B·A), float32: what
                                             load_model, `generate`, `eval` and `classify` read
    adapter_config.json + adapter.safetensors the adapters on their own (lora.py's adapter folder):
                                             `merge-lora` and `convert --to-hf --adapter` read them
and the trainer's files. A resumed run rebuilds the base from --init (recorded in run.toml) exactly as
the first run did, then loads A and B from the adapter file and any other trained tensor (a new
classification head) from model.safetensors, where it is stored as trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import WEIGHTS_FILE, classifier_head, model_from_state_dict, with_tied_head, write_model_files
from ..config import GPTConfig
from ..inference.quantize import float32_bias, quantize_rows
from ..model import GPTModel
from ..training.config import LORA_SETTINGS, ConfigError, RunConfig
from ..training.state import load_model_weights
from ..training.trainer import ModelHooks
from .lora import ADAPTER_WEIGHTS_FILE, LoRAConfig, LoRALinear, apply_lora, parameter_summary, write_adapter_files

BASE_DTYPES = ("float32", "bfloat16", "int8")


def lora_config(run: RunConfig) -> LoRAConfig | None:
    """The run's LoRA settings, or None for a full fine-tune; a combination that cannot work is a ConfigError."""
    settings = run.model
    if settings.lora_rank is None:
        given = [name for name in LORA_SETTINGS[1:] if getattr(settings, name) is not None]  # all but the rank
        if given:
            raise ConfigError(
                f"--{given[0].replace('_', '-')} sets up LoRA adapters; add --lora-rank (16 is the textbook's)"
            )
        return None
    if not settings.init:
        raise ConfigError("LoRA adapts a trained model and keeps its weights frozen; add --init CHECKPOINT")
    if run.train.fsdp:
        raise ConfigError("LoRA does not run under --fsdp (its frozen base is not sharded); drop --fsdp")
    base_dtype = settings.lora_base_dtype or "float32"
    if base_dtype not in BASE_DTYPES:
        raise ConfigError(f"--lora-base-dtype must be one of {', '.join(BASE_DTYPES)}, got {base_dtype!r}")
    if base_dtype == "bfloat16" and run.train.dtype == "float32":
        raise ConfigError(
            "--lora-base-dtype bfloat16 computes in bfloat16, and this run trains in float32 (--dtype float32, "
            "or auto on a device without bfloat16 arithmetic); pass --dtype bfloat16 or drop --lora-base-dtype"
        )
    try:
        return LoRAConfig(
            settings.lora_rank,
            settings.lora_alpha or settings.lora_rank,
            settings.lora_dropout or 0.0,
            tuple(settings.lora_targets or LoRAConfig.targets),
        )
    except ValueError as error:
        raise ConfigError(f"{error} (--lora-rank, --lora-alpha, --lora-dropout, --lora-targets)") from None


class FrozenInt8Linear(nn.Module):
    """A frozen Linear layer kept as int8 rows and their float32 scales (quantize_rows, the int8 inference
    format): a byte per weight instead of four. Each call dequantizes the weight, so gradients reach the
    input, which the adapters of earlier layers need; the weight gets none. (..., in) → (..., out)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight_int8, scales = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", weight_int8)  # (out, in)
        self.register_buffer("scales", scales)  # (out,)
        self.register_buffer("bias", float32_bias(linear))

    def float_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.float_weight().to(x.dtype), bias)


def lower_frozen(model: GPTModel, base_dtype: str) -> None:
    """Keep the frozen weights in bfloat16, or the frozen Linear weights in int8 (a head tied to the token
    embedding stays as it is: the embedding keeps the float copy anyway). Trained tensors stay float32."""
    if base_dtype == "bfloat16":
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    elif base_dtype == "int8":
        linears = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and not module.weight.requires_grad
            and module.weight is not model.tok_emb.weight
        ]
        for name, linear in linears:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FrozenInt8Linear(linear))


def add_adapters(
    model: GPTModel,
    lora: LoRAConfig,
    base_dtype: str,
    keep_training: Iterable[str] = (),
    log: Callable[[str], None] = print,
) -> GPTModel:
    """Freeze the model, add the adapters, let the `keep_training` modules (e.g. a new head) train in full,
    say how many parameters train, and lower the frozen base's precision."""
    apply_lora(model, lora)
    for name in keep_training:
        model.get_submodule(name).requires_grad_(True)
    log(f"{lora.describe()}, base in {base_dtype}; {parameter_summary(model)}")
    lower_frozen(model, base_dtype)
    return model


def plain_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the ordinary Linear layer that computes what `module` computes."""
    if isinstance(module, LoRALinear):
        weight, bias = plain_linear(module.base)
        return weight.float() + module.delta_weight(), bias
    if isinstance(module, FrozenInt8Linear):
        return module.float_weight(), module.bias
    return module.weight, module.bias


def merged_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The float32 weights of the plain model that computes what `model` does: every adapter folded into
    its weight, every int8 weight dequantized, under GPTModel's own names. The model is left as it is."""
    special = {
        name: module for name, module in model.named_modules() if isinstance(module, (LoRALinear, FrozenInt8Linear))
    }
    outer = {name: module for name, module in special.items() if not any(name.startswith(f"{p}.") for p in special)}
    state = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not any(name.startswith(f"{prefix}.") for prefix in outer)
    }
    for name, module in outer.items():
        weight, bias = plain_linear(module)
        state[f"{name}.weight"] = weight
        if bias is not None:
            state[f"{name}.bias"] = bias
    return {name: tensor.detach().float() for name, tensor in state.items()}


def restore_trained(folder: Path, model: GPTModel) -> None:
    """A LoRA run's resume (its base already rebuilt from --init): A and B from the adapter file, any other
    trained tensor from model.safetensors, where it is stored as trained (it is not merged into anything)."""
    adapters = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as weights, torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(adapters[name] if name in adapters else weights.get_tensor(name))


def finetune_hooks(
    run: RunConfig,
    meta: dict,
    prepare_task: Callable[[GPTModel], GPTModel] = lambda model: model,
    keep_training: Iterable[str] = (),
    log: Callable[[str], None] = print,
    report_parameters: bool = True,
) -> ModelHooks:
    """The loop's hooks for a fine-tune: `prepare_task` changes the model for the task (a classification
    head, frozen blocks); with LoRA the adapters go on after it, and `keep_training` names the task's new
    modules that train in full beside them. The trainable and total parameters are logged (with
    report_parameters=False only for LoRA: pretraining's own report says the rest). `meta` goes into each
    checkpoint's config.json (a chat template, a classifier's head) and into the adapter's own config."""
    lora = lora_config(run)

    def prepare(model: GPTModel) -> GPTModel:
        model = prepare_task(model)
        if lora is not None:
            model = add_adapters(model, lora, run.model.lora_base_dtype or "float32", keep_training, log)
        elif report_parameters:
            log(parameter_summary(model))
        return model

    def write_model(folder: Path, model: GPTModel, tokenizer, extra: dict | None = None) -> None:
        extra = {**(extra or {}), **meta}
        if lora is None:
            write_model_files(folder, model, tokenizer, extra)
            return
        cfg = model.cfg
        plain = model_from_state_dict(cfg, with_tied_head(cfg, merged_state_dict(model)), classifier_head(meta))
        write_model_files(folder, plain, tokenizer, extra)
        write_adapter_files(folder, model, lora, run.model.init, meta)

    return ModelHooks(
        prepare=prepare, write_model=write_model, read_model=load_model_weights if lora is None else restore_trained
    )


def run_hooks(run: RunConfig, cfg: GPTConfig, log: Callable[[str], None]) -> ModelHooks:
    """What `gptlab train` runs with (training.pipeline's HooksFor): LoRA adapters when the run asks for
    them, else the loop's own files."""
    check_lora_head(run, cfg)
    return finetune_hooks(run, meta={}, log=log, report_parameters=False)


def check_lora_head(run: RunConfig, cfg: GPTConfig) -> None:
    """An adapter on a head tied to the token embedding could not be merged without untying them, and the
    adapter would then no longer fit its own base; refuse it up front."""
    lora = lora_config(run)
    if lora is not None and "head" in lora.targets and cfg.tie_embeddings:
        raise ConfigError(
            f"--lora-targets head: {run.model.init} ties its output head to the token embedding "
            "(GPT-2 does), so the head cannot take an adapter of its own; leave head out"
        )
