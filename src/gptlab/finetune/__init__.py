"""Fine-tuning a trained model: LoRA adapters (lora.py), how fine-tuning plugs into the training loop
(hooks.py), instruction tuning (templates.py, instruct.py), classification (classify.py), their data
(records.py, rows.py) and the runs behind `gptlab finetune` (pipeline.py)."""

from .lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_parameters,
    merge_lora,
    parameter_summary,
    read_adapter,
    save_adapter,
)

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "adapter_state_dict",
    "apply_lora",
    "count_parameters",
    "load_adapter",
    "lora_parameters",
    "merge_lora",
    "parameter_summary",
    "read_adapter",
    "save_adapter",
]
