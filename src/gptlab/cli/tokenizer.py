"""`gptlab tokenizer train`: a byte-level BPE learned from one's own corpus (data/tokenizer_training.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import add_command
from .train import add_settings

DATA_OPTIONS = {"include", "exclude", "invalid_utf8", "text_field", "val_fraction"}


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from ..data.tokenizer_training import train_bpe, write_tokenizer_folder
    from ..interop.hf_tokenizer import write_tokenizer_files
    from ..tokenizer import TOKENIZER_FILE
    from ..training.config import DataConfig
    from ..training.pipeline import read_corpus

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to write the tokenizer to")
    if (out / TOKENIZER_FILE).exists() and not args.force:
        raise UserError(f"{out} already holds a tokenizer; choose another --out, or pass --force to replace it")
    settings = DataConfig(data=args.data, **{name: value for name, value in vars(args).items() if name in DATA_OPTIONS})
    corpus = read_corpus(settings)
    print(f"data: {corpus.summary()}")
    trained = train_bpe(corpus, args.vocab_size, train_fraction=1 - settings.held_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / TOKENIZER_FILE).unlink(missing_ok=True)  # until the new one is whole, the folder is no tokenizer
    write_tokenizer_files(out, trained.tokenizer, context_length=None)  # for transformers' AutoTokenizer
    write_tokenizer_folder(out, trained.record(corpus, 1 - settings.held_out))  # last: the folder is whole
    print(trained.summary())
    data = f" --data {' '.join(args.data)}" if args.data else ""
    print(f"tokenizer: {out}; train with: gptlab train --tokenizer {out}{data}")


def add_parsers(commands) -> None:
    tokenizer = add_command(commands, "tokenizer")
    actions = tokenizer.add_subparsers(dest="action", required=True)
    train = actions.add_parser(
        "train",
        help="learn a byte-level BPE from files, folders or globs",
        description="Learn a byte-level BPE with GPT-2's pre-tokenization and <|endoftext|> (Hugging Face's "
        "tokenizers trains it) from the training side of the corpus's split, and report its compression "
        "(bytes per token) on the held-out side against GPT-2's BPE. The folder holds gptlab_tokenizer.json "
        "and the files transformers' AutoTokenizer reads; `gptlab train --tokenizer FOLDER` uses it, and "
        "every checkpoint and export of that model carries it.",
    )
    train.add_argument(
        "--data", nargs="+", metavar="PATH", help="files, folders or glob patterns (default: the embedded corpus)"
    )
    train.add_argument(
        "--vocab-size", type=int, required=True, metavar="N", help="ids in all: 256 bytes, the merges, end-of-text"
    )
    train.add_argument("--out", required=True, metavar="FOLDER", help="the folder to write the tokenizer to")
    train.add_argument("--force", action="store_true", help="replace a tokenizer already in --out")
    add_settings(train, only=DATA_OPTIONS)
    train.set_defaults(run=cmd_train_tokenizer)
