"""Parameter counts and weight memory of a model, measured on a meta-device model (no memory used)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GPTConfig
from .model import GPTModel

MIB = 2**20


@dataclass(frozen=True)
class ParameterReport:
    config: GPTConfig
    total: int  # distinct parameters of the model as configured
    tied_total: int  # the count if the output head shares the token embedding's weight
    components: dict[str, int]  # embeddings, attention, feed-forward, norms, head (all blocks together)
    per_block: dict[str, int]  # attention, feed-forward, norms of one block

    def memory_mib(self, bytes_per_param: int) -> float:
        return self.total * bytes_per_param / MIB

    def format(self, name: str = "") -> str:
        cfg = self.config
        lines = [
            f"model {name}: vocab_size {cfg.vocab_size}, context_length {cfg.context_length}, emb_dim {cfg.emb_dim}, "
            f"n_heads {cfg.n_heads}, n_layers {cfg.n_layers}, drop_rate {cfg.drop_rate}, "
            f"attn_drop_rate {cfg.attention_drop_rate}, qkv_bias {cfg.qkv_bias}, tie_embeddings {cfg.tie_embeddings}",
            f"total parameters:              {self.total:>15,}",
            f"with head tied to tok_emb:     {self.tied_total:>15,}",
            "by component:",
        ]
        lines += [f"  {key:<28}{value:>15,}" for key, value in self.components.items()]
        lines.append(f"per block (x{cfg.n_layers}):")
        lines += [f"  {key:<28}{value:>15,}" for key, value in self.per_block.items()]
        lines.append(
            f"weight memory: {self.memory_mib(4):,.2f} MB in fp32, {self.memory_mib(2):,.2f} MB in bf16 (1 MB = 2^20 bytes)"
        )
        return "\n".join(lines)


def _component(parameter_name: str) -> str:
    if parameter_name.startswith(("tok_emb", "pos_emb")):
        return "embeddings"
    if parameter_name.startswith("out_head"):
        return "head"
    if parameter_name.startswith("final_norm") or ".norm" in parameter_name:
        return "norms"
    if ".att." in parameter_name:
        return "attention"
    if ".ff." in parameter_name:
        return "feed-forward"
    raise AssertionError(f"parameter {parameter_name} belongs to no component")


def parameter_report(cfg: GPTConfig) -> ParameterReport:
    with torch.device("meta"):
        model = GPTModel(cfg)
    components = dict.fromkeys(["embeddings", "attention", "feed-forward", "norms", "head"], 0)
    per_block = dict.fromkeys(["attention", "feed-forward", "norms"], 0)
    for name, param in model.named_parameters():  # a tied head is listed once, under tok_emb
        components[_component(name)] += param.numel()
        if name.startswith("trf_blocks.0."):
            per_block[_component(name)] += param.numel()
    per_block["total"] = sum(per_block.values())
    total = sum(components.values())
    tied_total = total - components["head"]
    return ParameterReport(cfg, total, tied_total, components, per_block)
