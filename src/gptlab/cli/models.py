"""`gptlab info`, `gptlab convert` and `gptlab download`: inspect, export and fetch model folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import is_gptlab_checkpoint
from ..errors import UserError
from ..finetune.lora import is_adapter_folder, read_adapter
from ..finetune.templates import chat_template_of, jinja_template
from ..hf_format import HF_TOKENIZER_CONFIG, is_hf_gpt2_folder
from ..interop.gguf import OUTTYPES, export_gguf
from ..interop.hf import HUB_REPOS, download_gpt2, export_hf
from ..interop.hf_tokenizer import SEGMENT_MARK
from ..interop.peft import export_peft_adapter
from ..loading import (
    load_classifier,
    load_model,
    read_classifier_head,
    read_model_config,
    read_tokenizer,
)
from ..report import parameter_report
from .common import (
    CHECKPOINT_FORMAT_NAMES,
    add_command,
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
        convert_adapter(args)
        return
    head = read_classifier_head(args.checkpoint)
    if args.to_gguf:
        if head is not None:
            raise UserError(
                f"{args.checkpoint} is {head.describe()}, and GGUF's gpt2 architecture is a language "
                f"model with no classification head; export it with `gptlab convert --to-hf "
                f"{args.checkpoint} DIR` (transformers' GPT2ForSequenceClassification), or label texts "
                f"with `gptlab classify --checkpoint {args.checkpoint}`"
            )
        model, tokenizer = load_model(args.checkpoint)
        template = chat_template_of(args.checkpoint)
        print(
            export_gguf(
                model,
                tokenizer,
                args.outdir,
                outtype=args.outtype,
                force=args.force,
                chat_template=template and jinja_template(template),
            ).format()
        )
        return
    if args.outtype != "f32":
        raise UserError("--outtype applies to --to-gguf only")
    if head is not None:
        classifier = load_classifier(args.checkpoint)
        files = export_hf(classifier.model, classifier.tokenizer, args.outdir, force=args.force, head=head)
        what = f"GPT2ForSequenceClassification with labels {', '.join(head.labels)}"
    else:
        model, tokenizer = load_model(args.checkpoint)
        template = chat_template_of(args.checkpoint)
        files = export_hf(
            model,
            tokenizer,
            args.outdir,
            force=args.force,
            chat_template=template and jinja_template(template, SEGMENT_MARK),
        )
        what = "GPT2LMHeadModel" + (f", chat template {template} in {HF_TOKENIZER_CONFIG}" if template else "")
    print(f"wrote {args.outdir}: {', '.join(files)} ({what})")


def convert_adapter(args: argparse.Namespace) -> None:
    """`convert --to-hf --adapter`: the adapter in a fine-tune's checkpoint (or an adapter folder) for PEFT."""
    if args.to_gguf:
        raise UserError(
            "--adapter writes a PEFT adapter for transformers; use --to-hf (GGUF takes a whole model: "
            "merge the adapter with `gptlab merge-lora` first)"
        )
    adapter = read_adapter(args.checkpoint)
    # PEFT's AutoPeftModel loads the recorded base, which must be a transformers folder
    hf_base = adapter.base if is_hf_gpt2_folder(Path(adapter.base)) else None
    files = export_peft_adapter(args.checkpoint, args.outdir, hf_base, force=args.force)
    base = hf_base or f"the export of {adapter.base}"
    if adapter.classifier is None:
        load = "GPT2LMHeadModel.from_pretrained(BASE)"
    else:
        try:
            pad = read_tokenizer(Path(adapter.base)).eot_id
        except ValueError:  # the base has moved: the id is its end-of-text token's
            pad = "EOT"
        load = (
            f"AutoModelForSequenceClassification.from_pretrained(BASE, id2label="
            f"{dict(enumerate(adapter.classifier.labels))}, pad_token_id={pad})"
        )
    print(
        f"wrote {args.outdir}: {', '.join(files)} (a PEFT adapter); load it with PeftModel.from_pretrained({load}, "
        f"'{args.outdir}'), BASE being {base}"
    )


def cmd_download(args: argparse.Namespace) -> None:
    outdir = args.out or Path("models") / args.name
    download_gpt2(args.name, outdir)
    print(f"downloaded {HUB_REPOS[args.name]} to {outdir}; use it with --checkpoint {outdir}")


def add_parsers(commands) -> None:
    info = add_command(commands, "info")
    add_model_arguments(info)
    info.add_argument("--checkpoint", type=Path, help="report on the model in this gptlab or Hugging Face GPT-2 folder")
    info.set_defaults(run=cmd_info)

    convert = add_command(commands, "convert")
    target = convert.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--to-hf", action="store_true", help="write a GPT-2 folder that transformers' from_pretrained loads"
    )
    target.add_argument(
        "--to-gguf",
        action="store_true",
        help="write one .gguf file (llama.cpp's gpt2 architecture) for llama.cpp, Ollama, LM Studio",
    )
    convert.add_argument(
        "--outtype",
        choices=list(OUTTYPES),
        default="f32",
        help="with --to-gguf: the matrices' type (norms, biases and positions stay f32; default f32)",
    )
    convert.add_argument("checkpoint", type=Path, help="a gptlab checkpoint or Hugging Face GPT-2 folder")
    convert.add_argument(
        "outdir",
        type=Path,
        metavar="OUT",
        help="the folder (--to-hf: new, empty, or an earlier export) or .gguf file (--to-gguf) to write",
    )
    convert.add_argument("--force", action="store_true", help="replace OUT even if it holds other files")
    convert.add_argument(
        "--adapter",
        action="store_true",
        help="write the LoRA adapter in CHECKPOINT (a fine-tune's "
        "checkpoint) as a PEFT adapter; a folder holding only an adapter is always written so",
    )
    convert.set_defaults(run=cmd_convert)

    download = add_command(commands, "download")
    download.add_argument("name", choices=list(HUB_REPOS))
    download.add_argument("--out", type=Path, help="destination folder (default models/NAME)")
    download.set_defaults(run=cmd_download)
