"""What every command shares: the one-line user error and the model-shape options."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import PRESETS, GPTConfig, get_config


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


CHECKPOINT_FORMAT_NAMES = {"gptlab": "gptlab checkpoint", "hf": "Hugging Face GPT-2 folder"}


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "gpt2") -> None:
    parser.add_argument("--model", default=default, choices=list(PRESETS), help=f"preset shape (default {default})")
    for field, kind in [("vocab_size", int), ("context_length", int), ("emb_dim", int), ("n_heads", int),
                        ("n_layers", int), ("drop_rate", float), ("attn_drop_rate", float)]:
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, help=f"override the preset's {field}")
    parser.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None)


def config_from_args(args: argparse.Namespace) -> GPTConfig:
    fields = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "attn_drop_rate", "qkv_bias",
              "tie_embeddings")
    return get_config(args.model, **{field: getattr(args, field) for field in fields})


def reject_shape_options(args: argparse.Namespace, source: str = "--checkpoint") -> None:
    shape_options = [field.name for field in dataclasses.fields(GPTConfig) if getattr(args, field.name) is not None]
    if shape_options:
        option = "--" + shape_options[0].replace("_", "-")
        raise UserError(f"{source} takes the model's shape from the checkpoint; drop {option}")


