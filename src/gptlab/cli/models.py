"""`gptlab info`, `gptlab convert` and `gptlab download`: inspect, export and fetch model folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import is_gptlab_checkpoint
from ..finetune.lora import is_adapter_folder, read_adapter
from ..interop.gguf import OUTTYPES, export_gguf
from ..interop.hf import (
    HUB_REPOS,
    download_gpt2,
    export_hf,
    is_hf_gpt2_folder,
)
from ..interop.peft import export_peft_adapter
from ..loading import load_model, read_model_config
from ..report import parameter_report
from .common import (
    CHECKPOINT_FORMAT_NAMES,
    UserError,
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
    if args.adapter or (is_adapter_folder(args.checkpoint) and not is_gptlab_checkpoint(args.checkpoint)):
        base = read_adapter(args.checkpoint).base
        # PEFT's AutoPeftModelForCausalLM loads the recorded base, which must be a transformers folder
        hf_base = base if is_hf_gpt2_folder(Path(base)) else None
        files = export_peft_adapter(args.checkpoint, args.outdir, hf_base, force=args.force)
        print(f"wrote {args.outdir}: {', '.join(files)} (a PEFT adapter); load it with PeftModel.from_pretrained("
              f"GPT2LMHeadModel.from_pretrained(BASE), '{args.outdir}'), BASE being {hf_base or f'the export of {base}'}")
        return
    model, tokenizer = load_model(args.checkpoint)
    if args.to_gguf:
        print(export_gguf(model, tokenizer, args.outdir, outtype=args.outtype, force=args.force).format())
        return
    if args.outtype != "f32":
        raise UserError("--outtype applies to --to-gguf only")
    files = export_hf(model, tokenizer, args.outdir, force=args.force)
    print(f"wrote {args.outdir}: {', '.join(files)}")


def cmd_download(args: argparse.Namespace) -> None:
    outdir = args.out or Path("models") / args.name
    download_gpt2(args.name, outdir)
    print(f"downloaded {HUB_REPOS[args.name]} to {outdir}; use it with --checkpoint {outdir}")



def add_parsers(commands) -> None:
    info = commands.add_parser("info", help="print a model's parameter report")
    add_model_arguments(info)
    info.add_argument("--checkpoint", type=Path, help="report on the model in this gptlab or Hugging Face GPT-2 folder")
    info.set_defaults(run=cmd_info)

    convert = commands.add_parser("convert", help="export a model for Hugging Face transformers (and PEFT) or "
                                  "llama.cpp (GGUF)")
    target = convert.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-hf", action="store_true",
                        help="write a GPT-2 folder that transformers' from_pretrained loads")
    target.add_argument("--to-gguf", action="store_true",
                        help="write one .gguf file (llama.cpp's gpt2 architecture) for llama.cpp, Ollama, LM Studio")
    convert.add_argument("--outtype", choices=list(OUTTYPES), default="f32",
                         help="with --to-gguf: the matrices' type (norms, biases and positions stay f32; default f32)")
    convert.add_argument("checkpoint", type=Path, help="a gptlab checkpoint or Hugging Face GPT-2 folder")
    convert.add_argument("outdir", type=Path, metavar="OUT", help="the folder (--to-hf: new, empty, or an earlier "
                         "export) or .gguf file (--to-gguf) to write")
    convert.add_argument("--force", action="store_true", help="replace OUT even if it holds other files")
    convert.add_argument("--adapter", action="store_true", help="write the LoRA adapter in CHECKPOINT (a fine-tune's "
                         "checkpoint) as a PEFT adapter; a folder holding only an adapter is always written so")
    convert.set_defaults(run=cmd_convert)

    download = commands.add_parser("download", help="fetch OpenAI's GPT-2 weights from the Hugging Face Hub")
    download.add_argument("name", choices=list(HUB_REPOS))
    download.add_argument("--out", type=Path, help="destination folder (default models/NAME)")
    download.set_defaults(run=cmd_download)
