"""LoRA (Hu et al., 2021): fine-tune a frozen model through a low-rank update of chosen weights.

A target weight W (out, in) stays frozen; beside it train A (rank, in) and B (out, rank), and compute

    y = base(x) + (dropout(x) · Aᵀ · Bᵀ) · alpha / rank

A starts like PEFT's (kaiming-uniform, a = √5) and B at zero, so before the first step the model
computes exactly what the base model does. The update can be folded into the weight afterwards
(W + alpha / rank · B·A, `merge_lora`) so that the fine-tuned model costs nothing extra to run.

An adapter folder holds only A and B (adapter.safetensors) and adapter_config.json: the LoRA settings,
the path of the base checkpoint and the base model's config, so that it is never put on another model.
The adapter of an instruction-tuned model records its chat template too; a classifier's records its head
(labels) and holds the head's weight (out_head.weight), which trains in full beside the adapters, so that
the adapter folder alone rebuilds the classifier from its base language model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import (
    CHAT_TEMPLATE_FIELD,
    CLASSIFIER_FIELD,
    CONFIG_FILE,
    ClassifierHead,
    classifier_head,
    give_classifier_head,
    is_gptlab_checkpoint,
    read_json,
    save_model,
    write_folder_atomically,
)
from ..config import GPTConfig
from ..errors import UserError
from ..loading import load_model
from ..model import Dropout, GPTModel

# Target name -> the module it wraps, relative to a transformer block (or to the model, for the head).
BLOCK_TARGETS = {"qkv": "att.qkv", "out_proj": "att.out_proj", "fc": "ff.fc", "proj": "ff.proj"}
TARGETS = (*BLOCK_TARGETS, "head")
HEAD_MODULE = "out_head"
TARGET_OF_MODULE = {module: target for target, module in {**BLOCK_TARGETS, "head": HEAD_MODULE}.items()}

ADAPTER_FORMAT = "gptlab-lora"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter.safetensors"
# The base config fields an adapter depends on. context_length is not one: A and B do not depend on
# it, and a run may crop the base's position table (--context-length) without changing any weight.
BASE_FIELDS = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_embeddings")
HEAD_WEIGHT = f"{HEAD_MODULE}.weight"  # a classifier adapter's head, trained in full


@dataclass(frozen=True)
class LoRAConfig:
    """Which weights get an adapter, and its rank, scale (alpha / rank) and input dropout."""

    rank: int = 16
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "out_proj", "fc", "proj")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r} (16 is the textbook's)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise UserError(
                f"LoRA alpha must be a positive number, got {self.alpha!r} (the update is scaled "
                "by alpha / rank; alpha = rank scales it by 1)"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [target for target in targets if target not in TARGETS]
        if unknown or not targets:
            raise UserError(
                f"LoRA targets must be some of {', '.join(TARGETS)}, got {unknown[0] if unknown else 'none'!r}"
            )
        # Canonical order, no repeats: equal configs compare equal whatever order they were written in.
        object.__setattr__(self, "targets", tuple(target for target in TARGETS if target in targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def describe(self) -> str:
        return f"LoRA rank {self.rank}, alpha {self.alpha:g} on {', '.join(self.targets)}"

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        return cls(**data)


class AdapterDropout(Dropout):
    """The dropout on an adapter's input. Its rate is the adapter's own setting (LoRAConfig.dropout, saved with
    the adapter and exported to PEFT), so the training loop's dropout schedule, which switches and doubles the
    model's own dropout, leaves it as it is (training.dropout.DropoutSwitch reads this flag)."""

    follows_dropout_schedule = False


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: (..., in) → (..., out).

    `base` is an nn.Linear or any module with in_features / out_features that maps (..., in) to
    (..., out), such as gptlab.inference.quantize's integer layers. A and B are float32 whatever the
    base's dtype: a bfloat16 copy of a small update rounds much of it away.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        # The base's device; a base without tensors (an int8 layer keeps only its packed weight, and the
        # CPU runs it) leaves A and B on the default device.
        device = next((tensor.device for tensor in [*base.parameters(), *base.buffers()]), None)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default, which nn.Linear uses too
        self.dropout = AdapterDropout(dropout)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # One cast of the input for both products (autocast would make one for each, and one more
            # back and forth for a float32 A), and one for its gradient.
            x = x.to(torch.get_autocast_dtype(x.device.type))
            low_rank_input = self.dropout(x)
        else:  # the update in A's float32, whatever the base's dtype
            low_rank_input = self.dropout(x).to(self.lora_A.dtype)
        y = self.base(x)
        # scaled at rank width, where it costs least: (..., in) → (..., rank) → (..., out)
        update = (low_rank_input @ self.lora_A.T * self.scale) @ self.lora_B.T
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight (out, in), in float32."""
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def target_modules(model: GPTModel, targets: tuple[str, ...]) -> list[str]:
    """The dotted names of the modules the targets name, in model order."""
    names = [
        f"trf_blocks.{layer}.{BLOCK_TARGETS[target]}"
        for layer in range(len(model.trf_blocks))
        for target in targets
        if target in BLOCK_TARGETS
    ]
    return names + [HEAD_MODULE] * ("head" in targets)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def apply_lora(model: GPTModel, config: LoRAConfig) -> GPTModel:
    """Freeze every parameter of the model and wrap each target in a LoRALinear (in place); returns the model."""
    if lora_modules(model):
        raise UserError("the model already has LoRA adapters; merge them (merge_lora) before adding others")
    model.requires_grad_(False)
    for name in target_modules(model, config.targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        # A new module is in training mode: follow the model's, or an eval model would drop out its inputs.
        lora = LoRALinear(base, config.rank, config.alpha, config.dropout).train(model.training)
        setattr(parent, child, lora)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every A and B of the model: what the optimizer trains."""
    return [param for module in lora_modules(model).values() for param in (module.lora_A, module.lora_B)]


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig that apply_lora was given, read back from the model's adapters."""
    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA adapters; call apply_lora(model, LoRAConfig(...)) first")
    first = next(iter(modules.values()))
    targets = {TARGET_OF_MODULE[re.sub(r"^trf_blocks\.\d+\.", "", name)] for name in modules}
    return LoRAConfig(first.rank, first.alpha, first.dropout.p, tuple(targets))


def merge_lora(model: GPTModel) -> GPTModel:
    """Fold every adapter into its weight (W + alpha / rank · B·A) and put the plain layer back, in place:
    the result is an ordinary GPTModel with every parameter trainable again. Returns the model.

    A head tied to the token embedding is untied first: folding the update into the shared weight would
    change the embedding too.
    """
    modules = lora_modules(model)
    for name, module in modules.items():  # all checked before any is changed
        weight = getattr(module.base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise UserError(
                f"cannot merge the adapter of {name} into a {type(module.base).__name__} (no float "
                "weight); merge into the float model, then quantize it"
            )
    for name, module in modules.items():
        weight = module.base.weight
        merged = weight.detach().float() + module.delta_weight().detach()
        # A new tensor rather than an in-place add: the base weight may be a memory-mapped file or tied.
        module.base.weight = nn.Parameter(merged.to(weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.base)
        if name == HEAD_MODULE and model.cfg.tie_embeddings:
            model.cfg = model.cfg.replace(tie_embeddings=False)
    return model.requires_grad_(True)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors, named "<module>.lora_A" / "<module>.lora_B" (e.g. trf_blocks.0.att.qkv.lora_A)."""
    return {
        f"{name}.{part}": getattr(module, part).detach().contiguous()
        for name, module in lora_modules(model).items()
        for part in ("lora_A", "lora_B")
    }


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied head counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


# ---------------------------------------------------------------------------------------------------
# Adapter folders.


@dataclass(frozen=True)
class Adapter:
    """An adapter folder's contents: settings, the base it was made for, the A and B tensors, and what the
    model it belongs to is beyond its base: a classifier's head (and its weight), a chat template."""

    config: LoRAConfig
    base: str  # the base checkpoint's path, as given to save_adapter
    base_config: GPTConfig
    tensors: dict[str, torch.Tensor]
    classifier: ClassifierHead | None = None
    head_weight: torch.Tensor | None = None  # the classifier's out_head.weight (one row per label)
    chat_template: str | None = None

    def model_fields(self) -> dict:
        """The config.json fields of the model it makes with its base (a classifier's head, a chat template)."""
        fields = {CLASSIFIER_FIELD: self.classifier.to_dict()} if self.classifier else {}
        return {**fields, **({CHAT_TEMPLATE_FIELD: self.chat_template} if self.chat_template else {})}


def is_adapter_folder(path: Path) -> bool:
    try:
        return read_json(Path(path) / ADAPTER_CONFIG_FILE).get("format") == ADAPTER_FORMAT
    except (OSError, ValueError):
        return False


def save_adapter(
    folder: Path,
    model: GPTModel,
    config: LoRAConfig,
    base: str,
    classifier: ClassifierHead | None = None,
    chat_template: str | None = None,
) -> None:
    """Write the model's adapters to `folder` (adapter.safetensors + adapter_config.json), atomically.

    `base` is the checkpoint the adapters were trained on, recorded for merge-lora; `classifier` the head of
    a classifier (its weight is saved too), `chat_template` the template an instruction-tuned model was
    trained with. An existing folder is only replaced when it is an earlier adapter folder.
    """
    folder = Path(folder)
    if lora_config_of(model) != config:
        raise UserError(
            f"config ({config.describe()}) does not describe the model's adapters ({lora_config_of(model).describe()})"
        )
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not is_adapter_folder(folder):
        raise UserError(f"{folder} exists and is not a LoRA adapter folder; choose a new folder")
    fields = {CLASSIFIER_FIELD: classifier.to_dict()} if classifier else {}
    fields.update({CHAT_TEMPLATE_FIELD: chat_template} if chat_template else {})
    write_folder_atomically(folder, lambda tmp: write_adapter_files(tmp, model, config, base, fields))


def write_adapter_files(
    folder: Path, model: GPTModel, config: LoRAConfig, base: str, model_fields: dict | None = None
) -> None:
    """adapter_config.json and adapter.safetensors into an existing folder (a training checkpoint holds them too).
    `model_fields`: the model's config.json fields; its classifier head and chat template are recorded."""
    model_fields = model_fields or {}
    kept = {name: model_fields[name] for name in (CLASSIFIER_FIELD, CHAT_TEMPLATE_FIELD) if model_fields.get(name)}
    tensors = adapter_state_dict(model)
    if CLASSIFIER_FIELD in kept:
        head = model.get_submodule(HEAD_MODULE)
        if isinstance(head, LoRALinear):
            raise UserError(
                "a classifier's head trains in full; it cannot also take an adapter (leave head out of "
                "the LoRA targets)"
            )
        tensors[HEAD_WEIGHT] = head.weight.detach().float().contiguous()
    meta = {
        "format": ADAPTER_FORMAT,
        "lora": asdict(config),
        "base": str(base),
        "base_config": model.cfg.to_dict(),
        **kept,
    }
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file({name: tensor.cpu() for name, tensor in tensors.items()}, str(folder / ADAPTER_WEIGHTS_FILE))


def read_adapter(folder: Path) -> Adapter:
    """An adapter folder's contents; a folder that is not one gets a one-line ValueError."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_FILE).is_file():
        raise UserError(
            f"{folder} is not a LoRA adapter folder (no {ADAPTER_CONFIG_FILE}); pass the folder "
            "save_adapter or fine-tuning wrote"
        )
    meta = read_json(folder / ADAPTER_CONFIG_FILE)
    if meta.get("format") != ADAPTER_FORMAT:
        kind = "a Hugging Face PEFT adapter" if "peft_type" in meta else f"format {meta.get('format')!r}"
        raise UserError(
            f"{folder / ADAPTER_CONFIG_FILE} is {kind}, not a gptlab LoRA adapter (format {ADAPTER_FORMAT!r})"
        )
    try:
        config = LoRAConfig.from_dict(meta["lora"])
        base_config = GPTConfig.from_dict(meta["base_config"])
        base = meta["base"]
        classifier = classifier_head({CLASSIFIER_FIELD: meta[CLASSIFIER_FIELD]} if CLASSIFIER_FIELD in meta else {})
    except (KeyError, TypeError) as error:
        raise UserError(f"{folder / ADAPTER_CONFIG_FILE} lacks or garbles {error}; re-create the adapter") from None
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
    except (OSError, SafetensorError) as error:
        raise UserError(f"cannot read {folder / ADAPTER_WEIGHTS_FILE} ({error}); re-create the adapter") from None
    head_weight = tensors.pop(HEAD_WEIGHT, None)
    if classifier is not None and head_weight is None:
        raise UserError(
            f"{folder / ADAPTER_WEIGHTS_FILE} lacks {HEAD_WEIGHT}, the head of the classifier "
            f"{ADAPTER_CONFIG_FILE} describes; re-create the adapter"
        )
    template = meta.get(CHAT_TEMPLATE_FIELD)
    if is_gptlab_checkpoint(folder):  # the run checkpoint it lives in, written before adapters recorded these
        model_meta = read_json(folder / CONFIG_FILE)
        template = template or model_meta.get(CHAT_TEMPLATE_FIELD)
        if classifier is None and classifier_head(model_meta) is not None:
            raise UserError(
                f"{folder} is a classifier whose adapter was saved without the classifier's head (by "
                f"an earlier gptlab); its {CONFIG_FILE} and model.safetensors already hold the merged "
                f"classifier: use {folder} itself"
            )
    return Adapter(config, base, base_config, tensors, classifier, head_weight, template)


def apply_adapter(base_model: GPTModel, adapter: Adapter) -> GPTModel:
    """Put a saved adapter on its base model (in place, as apply_lora does); returns the model.

    A classifier's adapter gives the base its head first. A base whose shape or vocabulary differs from the
    adapter's own base is refused in one line.
    """
    if adapter.classifier is not None:
        rows = base_model.out_head.out_features
        if rows != base_model.cfg.vocab_size or list(adapter.head_weight.shape) != [
            len(adapter.classifier.labels),
            base_model.cfg.emb_dim,
        ]:
            raise UserError(
                f"the adapter is {adapter.classifier.describe()} made from a language model with "
                f"emb_dim {adapter.base_config.emb_dim}; load it onto the model it was trained from "
                f"({adapter.base})"
            )
        give_classifier_head(base_model, len(adapter.classifier.labels))
        with torch.no_grad():
            base_model.out_head.weight.copy_(adapter.head_weight)
    for field in BASE_FIELDS:
        ours, theirs = getattr(adapter.base_config, field), getattr(base_model.cfg, field)
        if ours != theirs:
            raise UserError(
                f"the adapter was made for a base with {field} {ours}, but this base has {field} "
                f"{theirs}; load it onto the model it was trained from ({adapter.base})"
            )
    model = apply_lora(base_model, adapter.config)
    current = adapter_state_dict(model)
    if current.keys() != adapter.tensors.keys():
        missing = sorted(current.keys() - adapter.tensors.keys()) or sorted(adapter.tensors.keys() - current.keys())
        raise UserError(
            f"the adapter's tensors do not match its settings ({missing[0]} is in one and not the "
            "other); re-create the adapter"
        )
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                param, saved = getattr(module, part), adapter.tensors[f"{name}.{part}"]
                if saved.shape != param.shape:
                    raise UserError(
                        f"adapter tensor {name}.{part} has shape {list(saved.shape)}, but the base "
                        f"needs {list(param.shape)}; re-create the adapter"
                    )
                param.copy_(saved)
    return model


def load_adapter(folder: Path, base_model: GPTModel) -> GPTModel:
    """The base model with the adapters saved in `folder` applied (in place); returns it."""
    return apply_adapter(base_model, read_adapter(folder))


@dataclass(frozen=True)
class Merged:
    """What merge_adapter_checkpoint wrote: a new checkpoint `out` from `base` (which it left as it was)."""

    adapter: Path
    base: Path
    out: Path
    config: LoRAConfig
    classifier: ClassifierHead | None
    chat_template: str | None

    def format(self) -> str:
        if self.classifier is not None:
            kind = self.classifier.describe()
        else:
            kind = f"a language model {f'with chat template {self.chat_template}' if self.chat_template else 'without a chat template'}"
        return (
            f"wrote {self.out}, a new checkpoint: {self.base} with the adapter in {self.adapter} "
            f"({self.config.describe()}) folded in, {kind}; {self.base} is unchanged"
        )


def merge_adapter_checkpoint(adapter_folder: Path, out: Path, base: Path | None = None, force: bool = False) -> Merged:
    """Fold a saved adapter into its base checkpoint and write the result as a new full gptlab checkpoint,
    with the adapter's chat template (else the base's) and a classifier adapter's head.

    `base` defaults to the checkpoint recorded in the adapter. `out` must be new or empty (or `force`),
    and never the base or the adapter itself.
    """
    adapter = read_adapter(adapter_folder)
    base_path, out = Path(base if base is not None else adapter.base), Path(out)
    if base is None and not base_path.exists():
        raise UserError(
            f"{base_path}, the base recorded in {Path(adapter_folder) / ADAPTER_CONFIG_FILE}, does not "
            "exist; pass the checkpoint the adapter was trained from (--base)"
        )
    for source, what in ((base_path, "the base checkpoint"), (Path(adapter_folder), "the adapter")):
        if out.resolve() == source.resolve():
            raise UserError(f"the output folder {out} is {what}; choose a new folder")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new folder, or pass --force to replace it")
    model, tokenizer = load_model(base_path)
    base_template = read_json(base_path / CONFIG_FILE).get(CHAT_TEMPLATE_FIELD)
    fields = {**({CHAT_TEMPLATE_FIELD: base_template} if base_template else {}), **adapter.model_fields()}
    save_model(out, merge_lora(apply_adapter(model, adapter)), tokenizer, fields)
    return Merged(
        Path(adapter_folder), base_path, out, adapter.config, adapter.classifier, fields.get(CHAT_TEMPLATE_FIELD)
    )
