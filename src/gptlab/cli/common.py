"""What every command shares: the one-line user error and the model-shape options."""

from __future__ import annotations

import argparse

from ..config import PRESETS, GPTConfig, get_config
from ..errors import UserError

# Every command: the module of gptlab.cli that parses and runs it, and its line in `gptlab --help`. Only the
# given command's module is imported (cli/__init__.py), so `gptlab --help` loads none of them.
COMMANDS = {
    "info": ("models", "print a model's parameter report"),
    "convert": ("models", "export a model for Hugging Face transformers (and PEFT) or llama.cpp (GGUF)"),
    "download": ("models", "fetch OpenAI's GPT-2 weights from the Hugging Face Hub"),
    "generate": ("generate", "generate text from a prompt"),
    "prepare": ("train", "tokenize a corpus once into a token cache that `gptlab train --prepared` trains from"),
    "tokenizer": ("tokenizer", "train a byte-level BPE tokenizer on your own corpus"),
    "train": ("train", "train a model on text (files, folders, globs; default: Python's docs)"),
    "eval": ("train", "loss, perplexity and bits per byte of a checkpoint on a text"),
    "demo": ("train", "the main job on the embedded default (what `make demo` runs)"),
    "finetune": ("finetune", "fine-tune a trained model to follow instructions or classify texts"),
    "classify": ("finetune", "label texts with a classifier that `finetune classify` made"),
    "merge-lora": ("finetune", "fold a LoRA adapter into its base model (a full checkpoint)"),
    "serve": ("serve", "serve a model with OpenAI's API and a playground page"),
}


def add_command(commands: argparse._SubParsersAction, name: str, **keywords) -> argparse.ArgumentParser:
    """The parser of one command, with its line from COMMANDS."""
    return commands.add_parser(name, help=COMMANDS[name][1], **keywords)


CHECKPOINT_FORMAT_NAMES = {"gptlab": "gptlab checkpoint", "hf": "Hugging Face GPT-2 folder"}


SHAPE_OPTIONS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_embeddings")


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "gpt2", vocab_size: bool = True) -> None:
    """--model and the shape overrides, for commands that may build a model from a preset (not from
    --checkpoint). Dropout is left out: it changes nothing outside training."""
    parser.add_argument("--model", default=default, choices=list(PRESETS), help=f"preset shape (default {default})")
    for field in SHAPE_OPTIONS[0 if vocab_size else 1 : 5]:  # the integer fields
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=int, help=f"override the preset's {field} (not with --checkpoint)"
        )
    parser.add_argument(
        "--qkv-bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="biases on the query, key and value projections (GPT-2 has them)",
    )
    parser.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="share the output head with the token embedding (GPT-2 does)",
    )


def config_from_args(args: argparse.Namespace) -> GPTConfig:
    return get_config(args.model, **{field: getattr(args, field, None) for field in SHAPE_OPTIONS})


def reject_shape_options(args: argparse.Namespace, source: str = "--checkpoint") -> None:
    shape_options = [field for field in SHAPE_OPTIONS if getattr(args, field, None) is not None]
    if shape_options:
        option = "--" + shape_options[0].replace("_", "-")
        raise UserError(f"{source} takes the model's shape from the checkpoint; drop {option}")
