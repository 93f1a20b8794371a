"""`gptlab info`, `gptlab convert` and `gptlab download`: inspect, export and fetch model folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint import load_model, read_model_config
from ..interop.hf import (
    HF_VOCAB_FILE,
    HUB_REPOS,
    download_gpt2,
    export_hf,
)
from ..report import parameter_report
from .common import (
    CHECKPOINT_FORMAT_NAMES,
    add_model_arguments,
    config_from_args,
    reject_shape_options,
)


def cmd_info(args: argparse.Namespace) -> None:
    if args.checkpoint is None:
        print(parameter_report(config_from_args(args)).format(args.model))
        return
    reject_shape_options(args)
    cfg, kind = read_model_config(args.checkpoint)  # config.json only: no weights are read
    print(f"checkpoint {args.checkpoint} ({CHECKPOINT_FORMAT_NAMES[kind]})")
    print(parameter_report(cfg).format(Path(args.checkpoint).name))


def cmd_convert(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.checkpoint)
    files = export_hf(model, tokenizer, args.outdir, force=args.force)
    print(f"wrote {args.outdir}: {', '.join(files)}")
    if HF_VOCAB_FILE not in files:
        print("note: transformers has no equivalent of this character-level tokenizer, so the folder has no tokenizer "
              "files; gptlab's load_model restores it from config.json", file=sys.stderr)


def cmd_download(args: argparse.Namespace) -> None:
    outdir = args.out or Path("models") / args.name
    download_gpt2(args.name, outdir)
    print(f"downloaded {HUB_REPOS[args.name]} to {outdir}; use it with --checkpoint {outdir}")



def add_parsers(commands) -> None:
    info = commands.add_parser("info", help="print a model's parameter report")
    add_model_arguments(info)
    info.add_argument("--checkpoint", type=Path, help="report on the model in this gptlab or Hugging Face GPT-2 folder")
    info.set_defaults(run=cmd_info)

    convert = commands.add_parser("convert", help="export a model folder for Hugging Face transformers")
    convert.add_argument("--to-hf", action="store_true", required=True,
                         help="write a GPT-2 folder that transformers' from_pretrained loads")
    convert.add_argument("checkpoint", type=Path, help="a gptlab checkpoint or Hugging Face GPT-2 folder")
    convert.add_argument("outdir", type=Path, help="the folder to write (new, empty, or an earlier export)")
    convert.add_argument("--force", action="store_true", help="replace OUTDIR even if it holds other files")
    convert.set_defaults(run=cmd_convert)

    download = commands.add_parser("download", help="fetch OpenAI's GPT-2 weights from the Hugging Face Hub")
    download.add_argument("name", choices=list(HUB_REPOS))
    download.add_argument("--out", type=Path, help="destination folder (default models/NAME)")
    download.set_defaults(run=cmd_download)
