"""gptlab LoRA adapters as Hugging Face PEFT adapters for transformers' GPT2LMHeadModel.

PEFT names an adapter's tensors after the module it wraps (base_model.model.transformer.h.0.attn.c_attn
.lora_A.weight) and stores A (rank, in) and B (out, rank) as nn.Linear weights: the same matrices as
gptlab's, whatever layout the wrapped module has. GPT-2's Conv1D layers store their weight [in, out];
`fan_in_fan_out` tells PEFT so, for merging (PEFT also sets it per layer itself, with a warning).

An export loads with
    PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_base), peft_dir)
where hf_base is the base model exported by export_hf (`gptlab convert --to-hf`). A classifier's adapter
is PEFT's SEQ_CLS task: its head, trained in full, is saved as PEFT saves a module it trains in full
(modules_to_save: score), and it loads onto the same base read as a classifier:
    PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(hf_base, id2label=...,
                              label2id=..., pad_token_id=EOT), peft_dir)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import ClassifierHead, read_json, write_folder_atomically
from ..errors import UserError
from ..finetune.lora import (
    BLOCK_TARGETS,
    HEAD_MODULE,
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    lora_config_of,
    read_adapter,
)
from ..hf_format import BLOCK_KEYS, HF_SCORE

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_FILES = {PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE}
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM's path to the wrapped GPT2LMHeadModel
HF_HEAD = "lm_head"
HF_SCORE_MODULE = HF_SCORE.removesuffix(".weight")


def hf_block_module(block_module: str) -> str:
    """A module inside a gptlab block -> its GPT-2 name inside a block: att.qkv -> attn.c_attn."""
    return BLOCK_KEYS[f"{block_module}.weight"][0].removesuffix(".weight")


def hf_module_name(module: str) -> str:
    """A gptlab module path -> GPT2LMHeadModel's: trf_blocks.3.att.qkv -> transformer.h.3.attn.c_attn."""
    if module == HEAD_MODULE:
        return HF_HEAD
    layer, block_module = re.fullmatch(r"trf_blocks\.(\d+)\.(.+)", module).groups()
    return f"transformer.h.{layer}.{hf_block_module(block_module)}"


def peft_target_modules(config: LoRAConfig) -> list[str]:
    """PEFT's target_modules for the config's targets.

    PEFT puts an adapter on every module whose path ends with a listed name at a dot. Both of GPT-2's
    output projections are called c_proj (attn.c_proj and mlp.c_proj), so "c_proj" alone would target
    both: each name carries its parent too, which makes it match exactly one kind of layer.
    """
    return [hf_block_module(BLOCK_TARGETS[target]) if target in BLOCK_TARGETS else HF_HEAD for target in config.targets]


def peft_adapter_config(config: LoRAConfig, base_model_name_or_path: str | None, classifier: bool = False) -> dict:
    """adapter_config.json for PEFT's LoraConfig; the fields left out take PEFT's defaults. A classifier's
    head is a module PEFT saves whole (modules_to_save), as its own SEQ_CLS task does."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": peft_target_modules(config),
        # Every target but the head is a Conv1D ([in, out]); with the head too, PEFT flips it for lm_head.
        "fan_in_fan_out": any(target in BLOCK_TARGETS for target in config.targets),
        "bias": "none",
        "use_rslora": False,  # the scale is alpha / rank, as gptlab's
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": [HF_SCORE_MODULE] if classifier else None,
    }


def peft_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gptlab adapter tensors (trf_blocks.0.att.qkv.lora_A) -> PEFT's names
    (base_model.model.transformer.h.0.attn.c_attn.lora_A.weight)."""
    renamed = {}
    for name, tensor in tensors.items():
        module, part = name.rsplit(".", 1)
        renamed[f"{PEFT_PREFIX}{hf_module_name(module)}.{part}.weight"] = tensor.detach().cpu().contiguous()
    return renamed


def is_previous_peft_export(folder: Path) -> bool:
    """A folder holding nothing but a PEFT adapter: replacing it loses nothing but that adapter."""
    try:
        is_peft = "peft_type" in read_json(folder / PEFT_CONFIG_FILE)
    except (OSError, ValueError):
        return False
    return is_peft and {entry.name for entry in folder.iterdir()} <= PEFT_FILES


def export_peft_adapter(
    source: Path | nn.Module,
    out_dir: Path,
    base_model_name_or_path: str | None = None,
    force: bool = False,
    classifier: ClassifierHead | None = None,
) -> list[str]:
    """Write a gptlab adapter (an adapter folder, or a model carrying adapters) as a PEFT adapter folder
    for GPT2LMHeadModel, or for GPT2ForSequenceClassification where it is a classifier's (an adapter folder
    says so; a model says so with `classifier`, its head): adapter_config.json + adapter_model.safetensors.
    Returns the file names.

    `base_model_name_or_path` is recorded for AutoPeftModel: the base's Hugging Face folder.
    An existing non-empty `out_dir` is only replaced when it is an earlier PEFT adapter or `force` is set.
    """
    out_dir = Path(out_dir)
    if isinstance(source, nn.Module):
        config, tensors = lora_config_of(source), adapter_state_dict(source)
        head = source.get_submodule(HEAD_MODULE)
        if (
            classifier is None
            and (head.base if isinstance(head, LoRALinear) else head).out_features != source.cfg.vocab_size
        ):
            raise UserError(
                "the model's output head has a row per label, not per token: it is a classifier; pass "
                "its head (classifier=) to export it for GPT2ForSequenceClassification"
            )
        head_weight = None if classifier is None else head.weight
    else:
        adapter = read_adapter(source)
        config, tensors, classifier, head_weight = (
            adapter.config,
            adapter.tensors,
            adapter.classifier,
            adapter.head_weight,
        )
    if out_dir.exists() and not force:
        if not out_dir.is_dir():
            raise UserError(f"{out_dir} exists and is not a folder; choose a new folder to export to")
        if any(out_dir.iterdir()) and not is_previous_peft_export(out_dir):
            raise UserError(
                f"{out_dir} is not empty and is not a PEFT adapter; choose a new folder, "
                "or pass force=True to replace it"
            )
    meta = peft_adapter_config(config, base_model_name_or_path, classifier is not None)
    renamed = peft_tensors(tensors)
    if classifier is not None:
        if list(head_weight.shape)[0] != len(classifier.labels):
            raise UserError(
                f"the classifier's head has {head_weight.shape[0]} rows but {len(classifier.labels)} "
                "labels; give the labels it was trained with"
            )
        renamed[f"{PEFT_PREFIX}{HF_SCORE}"] = head_weight.detach().float().cpu().contiguous()

    def write(folder: Path) -> None:
        (folder / PEFT_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(renamed, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})

    write_folder_atomically(out_dir, write)
    return sorted(entry.name for entry in out_dir.iterdir())
